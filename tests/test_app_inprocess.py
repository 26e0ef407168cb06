"""ServerApp + ClientApp end to end through the in-process LocalGrid (no Ray, no SuperLink)."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from atlas_flwr.client.local import initial_state
from atlas_flwr.client_app import app as client_app
from atlas_flwr.common.config import Config
from atlas_flwr.common.errors import AtlasError
from atlas_flwr.common.records import to_numpy, to_record
from atlas_flwr.common.state import module_ranks, state_digest
from atlas_flwr.server_app import run_federation
from atlas_tools.local_grid import LocalGrid
from tests.conftest import binding_tiers


@pytest.fixture()
def tiny_run_config(run_config: dict, tiny_models: dict) -> dict:
    run_config.update(
        {
            "strategy": "fedavg",
            "model": tiny_models["bert"],
            "tasks": "sst2,mrpc",
            "clients-per-task": 2,
            "max-samples-per-client": 24,
            "max-eval-samples": 16,
            "num-server-rounds": 2,
            "batch-size": 8,
            "lr": 0.01,
            "max-length": 32,
        }
    )
    return run_config


def _run(values: dict, num_nodes: int | None = None):
    cfg = Config.from_run_config(values)
    grid = LocalGrid(client_app, values, num_nodes or cfg.num_clients)
    return cfg, grid, run_federation(grid, cfg)


def test_fedavg_run_trains_aggregates_and_writes_results(tiny_run_config: dict) -> None:
    cfg, grid, outcome = _run({**tiny_run_config, "run-name": "fed"})
    run_dir = outcome.run_dir
    # Clients of a task share adapter, head and validation rows under FedAvg: one evaluation per task.
    assert grid.messages_seen.count("train") == 2 * 4 and grid.messages_seen.count("evaluate") == 2 * 2
    rounds = json.loads((run_dir / "rounds.json").read_text())
    assert [r["round"] for r in rounds] == [1, 2]
    adapter, head = initial_state(cfg)
    per_message = to_record(adapter).count_bytes() + to_record(head).count_bytes()
    raw = sum(v.numel() * 4 for v in adapter.values()) + sum(v.numel() * 4 for v in head.values())
    assert per_message > raw  # the serialized arrays, with their headers and key names
    for r in rounds:
        assert r["failures"] == 0
        # down: 4 train + 2 evaluate messages; up: 4 train replies (evaluate replies carry no arrays)
        assert r["bytes-sent"] == 6 * per_message
        assert r["bytes-received"] == 4 * per_message
        for key in ("sst2-accuracy", "mrpc-f1", "train-loss"):
            assert np.isfinite(r[key])
        # In-process, the clients train inside the server's train phase: their summed clocks fit in it.
        assert 0 < r["client-train-seconds"] <= r["train-seconds"]
    with (run_dir / "clients.csv").open() as fh:
        clients = list(csv.DictReader(fh))
    assert [c["task"] for c in clients] == ["sst2", "sst2", "mrpc", "mrpc"]
    assert all(0.0 <= float(c["accuracy"]) <= 1.0 and c["mcc"] != "" for c in clients)
    assert [float(c["evaluated-by"]) for c in clients] == [0, 0, 2, 2]
    assert clients[0]["accuracy"] == clients[1]["accuracy"] and clients[0]["loss"] == clients[1]["loss"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["bytes-sent-total"] == sum(r["bytes-sent"] for r in rounds)
    assert json.loads((run_dir / "config.json").read_text())["run-config"]["strategy"] == "fedavg"


def test_adapters_change_and_fedavg_shares_them(tiny_run_config: dict) -> None:
    cfg, _grid, outcome = _run(tiny_run_config)
    strategy = outcome.strategy
    init_adapter, _ = (to_numpy(s) for s in initial_state(cfg))
    adapters = [strategy.state_for(i)[0] for i in range(cfg.num_clients)]
    heads = [strategy.state_for(i)[1] for i in range(cfg.num_clients)]
    lora_b = next(k for k in init_adapter if "lora_B" in k)
    assert not np.allclose(adapters[0][lora_b], init_adapter[lora_b])  # B starts at zero and moved
    assert all(state_digest(a) == state_digest(adapters[0]) for a in adapters)  # one global adapter
    assert np.array_equal(heads[0]["weight"], heads[1]["weight"])
    assert not np.array_equal(heads[0]["weight"], heads[2]["weight"])


def test_local_only_gives_each_client_its_own_adapter(tiny_run_config: dict) -> None:
    cfg, grid, outcome = _run({**tiny_run_config, "strategy": "local-only"})
    strategy = outcome.strategy
    assert grid.messages_seen.count("evaluate") == 2 * 4  # distinct models: every client evaluates
    adapters = [strategy.state_for(i)[0] for i in range(cfg.num_clients)]
    lora_b = next(k for k in adapters[0] if "lora_B" in k)
    assert not np.array_equal(adapters[0][lora_b], adapters[1][lora_b])


def test_centralized_trains_one_model_per_task_on_the_union_of_its_rows(tiny_run_config: dict) -> None:
    from atlas_flwr.client.local import client_data

    cfg, grid, outcome = _run({**tiny_run_config, "strategy": "centralized"})
    # Only the first client of each task trains, and its task's other client takes its model.
    assert grid.messages_seen.count("train") == 2 * 2 and grid.messages_seen.count("evaluate") == 2 * 2
    federated = Config.from_run_config({**tiny_run_config, "strategy": "fedavg"})
    for first in (0, 2):
        pooled = list(client_data(cfg, first).train["input_ids"])
        own = [list(client_data(federated, i).train["input_ids"]) for i in (first, first + 1)]
        assert pooled == own[0] + own[1]
    states = [state_digest(*outcome.strategy.state_for(i)) for i in range(4)]
    assert states[0] == states[1] != states[2] == states[3]
    rounds = json.loads((outcome.run_dir / "rounds.json").read_text())
    assert all(r["num-examples"] == 2 * 2 * 24 for r in rounds)


def test_same_seed_same_results(tiny_run_config: dict) -> None:
    def metrics(name: str) -> list:
        _, _, outcome = _run({**tiny_run_config, "run-name": name})
        rows = json.loads((outcome.run_dir / "rounds.json").read_text())
        return [{k: v for k, v in r.items() if "seconds" not in k} for r in rows]

    assert metrics("a") == metrics("b")


def test_population_must_match_tasks_times_clients(tiny_run_config: dict) -> None:
    with pytest.raises(AtlasError, match="num-partitions = 3 but tasks x clients-per-task = 4"):
        _run(tiny_run_config, num_nodes=3)


def _flaky_app(failing: set[int]):
    """The real ClientApp, except that train raises on the given partition ids."""
    from flwr.clientapp import ClientApp

    from atlas_flwr import client_app as real

    flaky = ClientApp(mods=[real.one_line_errors])
    flaky.query("describe")(real.describe)
    flaky.evaluate()(real.evaluate)

    @flaky.train()
    def train(message, context):
        if int(context.node_config["partition-id"]) in failing:
            raise RuntimeError("disk on fire")
        return real.train(message, context)

    return flaky


def test_failed_replies_are_counted_and_the_round_goes_on(tiny_run_config: dict, caplog) -> None:
    cfg = Config.from_run_config(tiny_run_config)
    outcome = run_federation(LocalGrid(_flaky_app({1}), tiny_run_config, cfg.num_clients), cfg)
    rounds = json.loads((outcome.run_dir / "rounds.json").read_text())
    assert [r["failures"] for r in rounds] == [1, 1]
    assert all(r["num-examples"] == 3 * 24 for r in rounds)  # the failed client's rows are not counted
    assert "client 1 (sst2) failed: error 2: partition 1: RuntimeError: disk on fire\n" in caplog.text


def test_a_clientapp_error_reaches_the_server_as_one_line_naming_the_partition(tiny_run_config: dict) -> None:
    from flwr.app import ConfigRecord, Context, Message, RecordDict

    context = Context(
        run_id=1,
        node_id=5,
        node_config={"partition-id": 2, "num-partitions": 4},
        state=RecordDict(),
        run_config=tiny_run_config,
    )
    bad = {
        "our own error": (
            RecordDict({"config": ConfigRecord({"server-round": 1})}),
            "partition 2: AtlasError: message 'train' lacks the 'adapter' ArrayRecord",
        ),
        "a bug": (RecordDict(), "partition 2: KeyError: 'config'"),
    }
    for content, reason in bad.values():
        message = Message(content, dst_node_id=5, message_type="train", group_id="1")
        message.metadata.__dict__["_message_id"] = "m1"
        reply = client_app(message, context)
        assert reply.has_error() and reply.error.reason == reason and reply.error.code == 2


def test_every_client_failing_is_an_error(tiny_run_config: dict) -> None:
    cfg = Config.from_run_config(tiny_run_config)
    with pytest.raises(AtlasError, match="every client failed in 'train'"):
        run_federation(LocalGrid(_flaky_app({0, 1, 2, 3}), tiny_run_config, cfg.num_clients), cfg)


def test_missing_split_stops_the_run_before_round_one(tiny_run_config: dict, tmp_path) -> None:
    import shutil
    from pathlib import Path

    broken = tmp_path / "glue"
    for task in ("sst2", "mrpc"):
        (broken / task).mkdir(parents=True)
        shutil.copy(Path(tiny_run_config["data-dir"]) / task / "train.parquet", broken / task / "train.parquet")
    with pytest.raises(AtlasError, match=r"missing split file .*sst2/validation.parquet.*found for sst2: \['train'\]"):
        _run({**tiny_run_config, "data-dir": str(broken)})


def test_atlas_run_fingerprints_clusters_allocates_ranks_and_personalizes(tiny_run_config: dict) -> None:
    values = {**tiny_run_config, "strategy": "atlas", "fingerprint-rows": 16, "device-scale": 1.0}
    values["device-tiers"] = binding_tiers(Config.from_run_config(values))
    cfg, grid, outcome = _run(values | {"measure-memory": True})
    run_dir = outcome.run_dir
    assert grid.messages_seen.count("query.fingerprint") == cfg.num_clients
    # measure-memory: every reply carried its client's measurement (train replies with it are accepted).
    with (run_dir / "memory.csv").open() as fh:
        measured = list(csv.DictReader(fh))
    assert len(measured) == len(grid.messages_seen) and all(int(r["working-bytes"]) >= 0 for r in measured)
    assert {r["phase"] for r in measured} == {"describe", "fingerprint", "train", "evaluate"}
    with (run_dir / "memory-clients.csv").open() as fh:
        per_client = list(csv.DictReader(fh))
    assert [int(r["client-id"]) for r in per_client] == [0, 1, 2, 3]
    assert all(r["within-budget"] in ("True", "False") and int(r["predicted-train-bytes"]) > 0 for r in per_client)
    # The budget holds what a message allocates: its working bytes less the model file's pages it mapped in.
    for row in per_client:
        mine = [int(m["working-bytes"]) - int(m["file-bytes"]) for m in measured if m["client-id"] == row["client-id"]]
        assert int(row["max-allocated-bytes"]) == max(mine) <= int(row["max-working-bytes"])
    assert sum(int(r["messages"]) for r in per_client) == len(measured)
    clusters = json.loads((run_dir / "clusters.json").read_text())
    assert clusters["clustering"] == "learned" and len(clusters["groups"]) == 4 and "scores" in clusters
    adjacency = np.array(json.loads((run_dir / "adjacency.json").read_text())["a"])
    same = np.equal.outer(clusters["groups"], clusters["groups"]) & ~np.eye(4, dtype=bool)
    assert adjacency.shape == (4, 4) and np.allclose(adjacency, adjacency.T) and np.all(adjacency[same] > 0)
    # laplacian-graph = cluster: a group's own pairs set the bandwidth, so other groups weigh less.
    assert adjacency[~np.equal.outer(clusters["groups"], clusters["groups"])].max() < adjacency[same].min()
    with (run_dir / "ranks.csv").open() as fh:
        ranks = list(csv.DictReader(fh))
    small, large = ranks[0], ranks[1]  # tiers cycle with the partition id
    assert small["budget-binds"] == "True" and small["ranks-per-layer"].split()[0] == "0"
    assert int(small["predicted-peak-bytes"]) <= int(small["memory-budget-bytes"])
    assert large["ranks-per-layer"] == f"{cfg.lora_rank} {cfg.lora_rank}"
    # The small client trains only what its budget allowed and holds the rest frozen (frozen-layers = use).
    strategy = outcome.strategy
    assert small["frozen-modules"] == "2" and large["frozen-modules"] == "0"
    assert strategy.frozen[0] and all(".layer.0." in m for m in strategy.frozen[0])
    assert set(module_ranks(strategy.state_for(0)[0])) == set(module_ranks(strategy.state_for(1)[0]))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["switches"] == {
        "clustering": "learned",
        "ranks": "budget",
        "aggregation": "exact",
        "laplacian-eta": 0.5,
        "laplacian-graph": "cluster",
        "laplacian-input": "aggregate",
        "server-lr": 1.0,
        "factor-split": "balanced",
        "server-lr-rule": "fixed",
        "frozen-layers": "use",
        "over-budget": "shrink",
        "rank-tiers": "",
    }


@pytest.mark.parametrize("strategy", ["homlora", "hetlora"])  # flexlora: the same plan as hetlora, svd-dense
def test_heterogeneous_rank_baselines_train_what_each_device_holds(tiny_run_config: dict, strategy: str) -> None:
    values = {**tiny_run_config, "strategy": strategy, "rank-tiers": "2,4", "lora-rank": 4, "num-server-rounds": 1}
    _, grid, outcome = _run(values)
    ranks = [set(module_ranks(outcome.strategy.state_for(i)[0]).values()) for i in range(4)]
    with (outcome.run_dir / "ranks.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert all(r["fits-budget"] == "True" for r in rows)
    if strategy == "homlora":  # one plan for all: the smallest cap
        assert ranks == [{2}] * 4 and {r["plan"] for r in rows} == {"common"}
    else:  # caps cycle 2, 4 by partition id: each client trains and holds its own cap's rank
        assert ranks == [{2}, {4}, {2}, {4}] and [r["plan"] for r in rows] == ["shrink", "uniform"] * 2
    assert grid.messages_seen.count("train") == 4 and "query.fingerprint" not in grid.messages_seen
    summary = json.loads((outcome.run_dir / "summary.json").read_text())
    assert summary["switches"]["rank-tiers"] == "2,4" and summary["final"]
    energy = json.loads((outcome.run_dir / "rank-energy.json").read_text())
    assert [r["client-id"] for r in energy] == [0, 1, 2, 3] and {r["max-rank"] for r in energy} <= {2, 4}
    # Slices 1, 2, 3-4 up to the run's largest rank: 4 (2 under homlora).
    assert all(abs(sum(v for k, v in r.items() if k.startswith("energy-")) - 1) < 1e-6 for r in energy)
    assert ("energy-3-4" in energy[0]) == (strategy != "homlora")


@pytest.mark.parametrize("frozen_layers", ["use", "drop"])
def test_a_budget_bound_client_uses_its_groups_layers_frozen_or_drops_them(
    tiny_run_config: dict, frozen_layers: str
) -> None:
    values = {**tiny_run_config, "strategy": "atlas-no-laplacian", "fingerprint-rows": 16, "device-scale": 1.0}
    values |= {"clustering": "oracle", "frozen-layers": frozen_layers, "num-server-rounds": 1}
    values["device-tiers"] = binding_tiers(Config.from_run_config(values))
    _, grid, outcome = _run(values)
    strategy = outcome.strategy
    small, large = (strategy.state_for(i)[0] for i in (0, 1))  # one task: clients 0 (small tier) and 1
    # Fingerprint and evaluation run in slices that the small client's budget holds (at batch 64 neither does).
    rows = {r["client-id"]: r for r in json.loads((outcome.run_dir / "ranks.json").read_text())}
    for row in rows.values():
        assert row["predicted-fingerprint-bytes"] <= row["memory-budget-bytes"]
        assert row["predicted-eval-bytes"] <= row["memory-budget-bytes"]
    assert rows[0]["fingerprint-batch"] < rows[1]["fingerprint-batch"] <= 64 and rows[0]["eval-batch"] <= 64
    bottom = sorted(k for k in large if ".layer.0." in k)
    if frozen_layers == "drop":  # the old behaviour: what the budget cannot train is not held at all
        assert not strategy.frozen[0] and not set(bottom) & set(small)
        return
    # The small client trained only the top layer and got its group's bottom layer, which client 1 trained.
    assert set(strategy.frozen[0]) == {k.rsplit(".lora_", 1)[0] for k in bottom}
    for key in bottom:
        np.testing.assert_allclose(small[key], large[key], rtol=1e-5, atol=1e-7)
    init, _ = initial_state(Config.from_run_config(values))
    assert not np.allclose(small[bottom[-1]], init[bottom[-1]])  # a lora_B: it moved away from zero
    # Its train reply carried only the top layer: fewer bytes up than client 1's.
    assert grid.messages_seen.count("train") == 4


def test_run_train_freezes_the_frozen_modules_and_returns_only_the_trained_ones(tiny_run_config: dict) -> None:
    from atlas_flwr.client.local import run_train

    cfg = Config.from_run_config(tiny_run_config)
    adapter, head = (to_numpy(s) for s in initial_state(cfg))
    frozen = {m for m in module_ranks(adapter) if ".layer.0." in m}
    new_adapter, _, result = run_train(cfg, 0, 1, adapter, head, frozen)
    assert set(module_ranks(to_numpy(new_adapter))) == set(module_ranks(adapter)) - frozen and result.steps > 0
    assert all(not np.allclose(to_numpy(new_adapter)[k], adapter[k]) for k in new_adapter if "lora_B" in k)
    with pytest.raises(AtlasError, match="frozen module 'nope' is not in the received adapter"):
        run_train(cfg, 0, 1, adapter, head, {"nope"})


def test_fraction_train_samples_clients_each_round_and_evaluates_everyone(tiny_run_config: dict) -> None:
    _, grid, outcome = _run({**tiny_run_config, "fraction-train": 0.5})
    rounds = json.loads((outcome.run_dir / "rounds.json").read_text())
    assert grid.messages_seen.count("train") == 4 and [r["sampled"] for r in rounds] == [2, 2]
    clients = json.loads((outcome.run_dir / "clients.json").read_text())
    assert all("accuracy" in c or "f1" in c for c in clients)
