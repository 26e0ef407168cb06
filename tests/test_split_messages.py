"""Split learning over Flower messages (in-process Grid): the same steps as the halves run directly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.clientapp import ClientApp

from atlas_flwr.client import split_client
from atlas_flwr.client.identity import client_identity
from atlas_flwr.client.local import initial_state, new_model
from atlas_flwr.client.split_client import batch_at, batch_plan, split_step
from atlas_flwr.client.train import seed_for
from atlas_flwr.common.config import Config
from atlas_flwr.common.records import to_numpy, to_torch
from atlas_flwr.common.split_train import ClientSide, RngState
from atlas_flwr.common.state import module_ranks, state_digest
from atlas_flwr.models.classifier import LoraSettings, adapter_state, load_adapter_state
from atlas_flwr.models.split import SplitClassifier
from atlas_flwr.server.split_server import SplitClient, round_updates, run_split_round, server_half, split_adapter
from atlas_tools.local_grid import LocalGrid
from strategies.pipeline import ClientInfo


def _app(forget_between_messages: bool) -> ClientApp:
    app = ClientApp()

    @app.train("split")
    def train_split(message, context):
        if forget_between_messages:  # every message lands on a fresh worker: only context.state survives
            split_client._WORKERS.clear()
        cfg, client_id = client_identity(context)
        return split_step(message, context, cfg, client_id)

    return app


@pytest.fixture()
def cfg_values(run_config: dict, tiny_models: dict) -> dict:
    run_config.update(
        {
            "strategy": "fedavg",
            "model": tiny_models["bert"],
            "tasks": "sst2",
            "clients-per-task": 2,
            "max-samples-per-client": 20,
            "batch-size": 8,
            "lr": 0.01,
            "max-length": 32,
            "device": "cpu",  # the messages and the worker cache; the device path has its own test below
        }
    )
    return run_config


def _server_and_bottom(cfg: Config):
    adapter = to_numpy(initial_state(cfg)[0])
    rng = torch.Generator().manual_seed(1)
    adapter = {
        k: (torch.randn(v.shape, generator=rng).numpy() * 0.1 if "lora_B" in k else v) for k, v in adapter.items()
    }
    bottom, top = split_adapter(adapter, 1)
    model = new_model(cfg, "sst2", LoraSettings.from_module_ranks(module_ranks(top), cfg.lora_alpha, cfg.lora_dropout))
    load_adapter_state(model, to_torch(top))
    return bottom, model


def _run(cfg_values: dict, forget: bool):
    cfg = Config.from_run_config(cfg_values)
    grid = LocalGrid(_app(forget), cfg_values, cfg.num_clients)
    clients, bottom = [], None
    for i, node in enumerate(sorted(grid.get_node_ids())):
        bottom, server_model = _server_and_bottom(cfg)
        half = server_half(server_model, "bert", 1, cfg.lr, cfg.head_lr, cfg.weight_decay, "cpu")
        clients.append(SplitClient(ClientInfo(i, node, "sst2", 20, 0), 1, half))
    result = run_split_round(grid, clients, {c.client_id: bottom for c in clients}, server_round=1)
    return cfg, bottom, clients, result, grid


def test_message_rounds_match_direct_steps_with_and_without_worker_cache(cfg_values: dict) -> None:
    cfg, bottom, clients, cached, grid = _run(cfg_values, forget=False)
    _, _, clients_2, fresh, _ = _run(cfg_values, forget=True)
    assert cached.steps == len(batch_plan(cfg, 0, 1)) + 1 == 4  # 20 rows in batches of 8, then the final reply
    assert grid.messages_seen.count("train.split") == 2 * 4
    for cid in (0, 1):
        for key, value in cached.bottoms[cid].items():
            torch.testing.assert_close(torch.from_numpy(fresh.bottoms[cid][key]), torch.from_numpy(value))
        for a, b in zip(
            clients[cid].server.split.model.parameters(), clients_2[cid].server.split.model.parameters(), strict=True
        ):
            torch.testing.assert_close(a, b)

    # The same steps run directly: each client with its own server half, as a federated client trains alone.
    for cid in (0, 1):
        _, model = _server_and_bottom(cfg)
        direct_server = server_half(model, "bert", 1, cfg.lr, cfg.head_lr, cfg.weight_decay, "cpu")
        m = new_model(
            cfg, "sst2", LoraSettings.from_module_ranks(module_ranks(bottom), cfg.lora_alpha, cfg.lora_dropout)
        )
        load_adapter_state(m, to_torch(bottom))
        side = ClientSide(SplitClassifier(m, "bert", 1), lr=cfg.lr, weight_decay=cfg.weight_decay)
        rng = seed_for(cfg.seed, cid, 1)  # one random stream per client, through both halves
        for step in range(3):
            batch = batch_at(cfg, cid, 1, step)
            acts = side.forward(batch, rng)
            grad, _ = direct_server.step(acts, batch["attention_mask"], batch["labels"], RngState.now())
            rng = RngState.now()
            side.backward(grad)
        direct_server.settle()
        direct = to_numpy(adapter_state(side.split.model))
        for key, value in direct.items():
            torch.testing.assert_close(torch.from_numpy(cached.bottoms[cid][key]), torch.from_numpy(value))
        for a, b in zip(clients[cid].server.split.model.parameters(), model.parameters(), strict=True):
            torch.testing.assert_close(a, b)
    # The two clients' halves saw different batches: their tops differ.
    tops = [to_numpy(adapter_state(c.server.split.model)) for c in clients]
    assert state_digest(tops[0]) != state_digest(tops[1])


def test_bytes_are_counted_by_kind_and_updates_join_bottom_and_top(cfg_values: dict) -> None:
    _, bottom, clients, result, _ = _run(cfg_values, forget=False)
    assert set(result.bytes) == {"adapters-down", "adapters-up", "activations-up", "gradients-down"}
    # Activations and their gradients have the same shapes: the same bytes up as down (headers aside).
    assert result.bytes["activations-up"] > result.bytes["gradients-down"] > 0
    assert result.num_examples == {0: 20, 1: 20}
    assert set(result.losses) == {0, 1} and all(np.isfinite(v) for v in result.losses.values())
    updates = round_updates(clients, result)
    assert [u.client_id for u in updates] == [0, 1]
    for u, client in zip(updates, clients, strict=True):
        top = to_numpy(adapter_state(client.server.split.model))
        assert set(u.adapter) == set(bottom) | set(top)  # the whole adapter, as a federated client sends it
        assert all(np.array_equal(u.adapter[k], v) for k, v in result.bottoms[u.client_id].items())
        assert all(np.array_equal(u.adapter[k], v) for k, v in top.items())
        assert u.num_examples == 20 and u.metrics["train-loss"] == result.losses[u.client_id]


def test_split_run_end_to_end_in_the_round_loop(cfg_values: dict) -> None:
    import json

    from atlas_flwr.client_app import app as client_app
    from atlas_flwr.server_app import run_federation

    values = {**cfg_values, "tasks": "sst2,mrpc", "num-server-rounds": 2, "split": "auto", "max-eval-samples": 16}
    values["device-tiers"], values["device-scale"] = "1GB", 1.0
    cfg = Config.from_run_config(values)
    grid = LocalGrid(client_app, values, cfg.num_clients)
    outcome = run_federation(grid, cfg)
    rounds = json.loads((outcome.run_dir / "rounds.json").read_text())
    choices = json.loads((outcome.run_dir / "split.json").read_text())
    assert [c["cut"] for c in choices] == [1, 1, 1, 1]  # a 2-block model: the only cut
    assert grid.messages_seen.count("train") == 0 and grid.messages_seen.count("train.split") == 2 * 4 * 4
    for r in rounds:
        assert r["split-activations-up-bytes"] > 0 and r["split-gradients-down-bytes"] > 0
        assert r["bytes-received"] >= r["split-activations-up-bytes"] + r["split-adapters-up-bytes"]
    # FedAvg, as without split: one adapter (bottom and top) for all, one head per task; both moved.
    states = [outcome.strategy.state_for(i) for i in range(4)]
    bottom_key = next(k for k in states[0][0] if ".layer.0." in k and "lora_B" in k)
    top_key = next(k for k in states[0][0] if ".layer.1." in k and "lora_B" in k)
    for key in (bottom_key, top_key):
        assert all(np.array_equal(s[0][key], states[0][0][key]) for s in states)
        assert np.abs(states[0][0][key]).sum() > 0
    assert state_digest(states[0][1]) == state_digest(states[1][1]) != state_digest(states[2][1])
    # Every client's final train loss reaches clients.csv, as in a federated run.
    clients = json.loads((outcome.run_dir / "clients.json").read_text())
    assert len(clients) == 4 and all(np.isfinite(c["train-loss"]) and c["train-loss"] > 0 for c in clients)


def test_split_budget_too_small_is_one_line(cfg_values: dict) -> None:
    from atlas_flwr.client_app import app as client_app
    from atlas_flwr.common.errors import AtlasError
    from atlas_flwr.server_app import run_federation

    values = {**cfg_values, "split": "auto", "device-tiers": "1MB", "device-scale": 1.0}
    cfg = Config.from_run_config(values)
    with pytest.raises(
        AtlasError, match=r"client 0 \(1MB\): budget 1 MB is below the .* a client needs with one block"
    ):
        run_federation(LocalGrid(client_app, values, cfg.num_clients), cfg)


#: How close a split run's states are to the federated run's: fp32 on the CPU; in fp16 autocast on CUDA the
#: two runs round the same kernels' outputs, but attention's backward accumulates in a nondeterministic order.
TOLERANCE = {"rtol": 2e-2, "atol": 1e-3} if torch.cuda.is_available() else {"rtol": 1e-4, "atol": 1e-6}


def _same_states_with_and_without_the_cut(values: dict) -> tuple[dict[str, list], list]:
    """Run ``values`` without split and cut at block 1; assert every client ends with the same adapter and
    head (:data:`TOLERANCE`); return both runs' states and pipelines."""
    from atlas_flwr.client_app import app as client_app
    from atlas_flwr.server_app import run_federation

    states, pipelines = {}, []
    for split in ("none", "1"):
        run = {**values, "split": split, "run-name": f"split-{split}"}
        cfg = Config.from_run_config(run)
        outcome = run_federation(LocalGrid(client_app, run, cfg.num_clients), cfg)
        states[split] = [outcome.strategy.state_for(i) for i in range(cfg.num_clients)]
        pipelines.append(outcome.strategy)
    for (adapter, head), (split_adapter_, split_head) in zip(states["none"], states["1"], strict=True):
        assert set(adapter) == set(split_adapter_)
        for key in adapter:
            np.testing.assert_allclose(split_adapter_[key], adapter[key], **TOLERANCE)
        for key in head:
            np.testing.assert_allclose(split_head[key], head[key], **TOLERANCE)
    return states, pipelines


def test_split_rounds_compute_what_federated_rounds_compute(cfg_values: dict) -> None:
    """Cutting the model changes where each step runs, not what it computes: dropout included.

    ``device = auto``: on a GPU both halves run on CUDA in fp16 autocast with one loss scale, as the federated
    client does; without one, on the CPU."""

    values = {**cfg_values, "tasks": "sst2,mrpc", "num-server-rounds": 2, "max-eval-samples": 8, "device": "auto"}
    assert values["lora-dropout"] > 0  # and the tiny BERT's hidden and attention dropout are 0.1
    states = _same_states_with_and_without_the_cut(values)[0]
    assert any(np.abs(a[k]).sum() > 0 for a, _ in states["1"] for k in a if "lora_B" in k)


def test_four_phases_split_rounds_compute_what_federated_rounds_compute(cfg_values: dict) -> None:
    """atlas (learned groups, budget ranks, exact aggregation, the Laplacian) with the model cut at block 1
    gives the states the same run gives without the cut, at ranks 2 and 4 inside the same modules."""

    values = {**cfg_values, "strategy": "atlas", "tasks": "sst2,mrpc", "num-server-rounds": 2, "device": "cpu"}
    values |= {"max-eval-samples": 8, "fingerprint-rows": 16, "rank-tiers": "2,4", "lora-rank": 4}
    values |= {"device-tiers": "1GB", "device-scale": 1.0}
    states, pipelines = _same_states_with_and_without_the_cut(values)
    assert all(p.eta > 0 and p.switches.ranks == "budget" for p in pipelines)
    assert [set(module_ranks(a).values()) for a, _ in states["1"]] == [{2}, {4}, {2}, {4}]


def test_split_with_budget_ranks_trains_below_the_cut_what_the_budget_allows(cfg_values: dict) -> None:
    import json

    from atlas_flwr.client_app import app as client_app
    from atlas_flwr.server.shapes import model_shape, train_shape
    from atlas_flwr.server_app import run_federation
    from strategies.memory import Calibration
    from strategies.split_cut import split_client_peak_bytes

    values = {**cfg_values, "strategy": "atlas", "split": "auto", "num-server-rounds": 1, "max-eval-samples": 8}
    values |= {"fingerprint-rows": 16, "lora-rank": 8, "device-scale": 1.0}
    cfg = Config.from_run_config(values)
    shape, step, cal = model_shape(cfg), train_shape(cfg), Calibration.for_device("cpu")
    at = {r: split_client_peak_bytes(shape, step, [r, 8], 1, calibration=cal)["total"] for r in (2, 4, 8)}
    values["device-tiers"] = f"{(at[2] + at[4]) // 2}B,{2 * at[8]}B"  # client 0: rank 2 below the cut; client 1: 8
    cfg = Config.from_run_config(values)
    outcome = run_federation(LocalGrid(client_app, values, cfg.num_clients), cfg)
    rows = json.loads((outcome.run_dir / "ranks.json").read_text())
    assert [r["ranks-per-layer"] for r in rows] == ["2 8", "8 8"] and [r["cut"] for r in rows] == [1, 1]
    assert all(r["predicted-peak-bytes"] <= r["memory-budget-bytes"] for r in rows)
    split = json.loads((outcome.run_dir / "split.json").read_text())
    assert [s["client-predicted-bytes"] for s in split] == [r["predicted-peak-bytes"] for r in rows]
    small, large = (outcome.strategy.state_for(i)[0] for i in (0, 1))
    assert {r for m, r in module_ranks(small).items() if ".layer.0." in m} == {2}
    assert {r for m, r in module_ranks(large).items() if ".layer.0." in m} == {8}
    assert {r for m, r in module_ranks(small).items() if ".layer.1." in m} == {8}  # the server's half


def test_a_uniform_method_under_split_keeps_each_device_rank_cap(cfg_values: dict) -> None:
    # Split answers the memory budget with its cut; a device's rank cap still binds a baseline's plan.
    from atlas_flwr.server.plan import plan_federation
    from strategies.pipeline import resolve_switches

    values = {**cfg_values, "strategy": "fedavg-cluster", "clustering": "oracle", "split": "auto", "lora-rank": 8}
    cfg = Config.from_run_config(values)
    clients = [ClientInfo(i, i, "sst2", 20, 8, memory_bytes=10**9, max_rank=cap) for i, cap in enumerate((2, 8))]
    plan = plan_federation(
        None, cfg, clients, resolve_switches(cfg.strategy, cfg.clustering, cfg.ranks, cfg.aggregation)
    )
    held = [set(module_ranks(plan.initial[c.client_id][0]).values()) for c in clients]
    assert held == [{2}, {8}]
    assert [r["plan"] for r in plan.ranks] == ["shrink", "uniform"] and "cut" in plan.ranks[0]
