"""Memory-feasible baselines: over-budget policies, homogeneous LoRA, HetLoRA and FlexLoRA (issue 17 item 4)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from atlas_flwr.client.train import tail_penalty
from atlas_flwr.common.config import Config
from atlas_flwr.common.devices import profile_for
from atlas_flwr.common.errors import AtlasError
from atlas_flwr.common.state import module_ranks, state_digest
from atlas_flwr.server.plan import plan_federation
from atlas_flwr.server.shapes import model_shape, train_shape
from strategies.aggregation import energy_by_slice, lora_scaling
from strategies.memory import predict_peak_bytes
from strategies.pipeline import (
    ClientInfo,
    Member,
    PersonalizedPipeline,
    Update,
    aggregate_group,
    delta_norm,
    resolve_switches,
    self_prune,
    truncate_ranks,
)

ALPHA = 16.0
MODULES = [f"encoder.layer.{i}.attention.self.query" for i in range(2)]


def _adapter(rng: np.random.Generator, ranks: dict[str, int], scale: float = 1.0) -> dict[str, np.ndarray]:
    out = {}
    for module, r in ranks.items():
        out[module + ".lora_A.weight"] = rng.normal(size=(r, 10)).astype(np.float32)
        out[module + ".lora_B.weight"] = (scale * rng.normal(size=(12, r))).astype(np.float32)
    return out


def _dense(state: dict[str, np.ndarray], module: str) -> np.ndarray:
    a, b = state[module + ".lora_A.weight"].astype(np.float64), state[module + ".lora_B.weight"].astype(np.float64)
    return lora_scaling(ALPHA, a.shape[0]) * b @ a


def _head() -> dict[str, np.ndarray]:
    return {"weight": np.zeros((2, 3), np.float32), "bias": np.zeros((2,), np.float32)}


def _pipeline(strategy: str, ranks: list[dict[str, int]], **kwargs) -> PersonalizedPipeline:
    rng = np.random.default_rng(0)
    members = [Member(i, "sst2", 0) for i in range(len(ranks))]
    initial = {i: (_adapter(rng, r), _head()) for i, r in enumerate(ranks)}
    return PersonalizedPipeline(strategy, resolve_switches(strategy), members, initial, ALPHA, **kwargs)


def test_factor_avg_over_unequal_ranks_is_zero_pad_and_over_equal_ranks_unchanged() -> None:
    rng = np.random.default_rng(1)
    hetero = [_adapter(rng, dict.fromkeys(MODULES, r)) for r in (2, 4)]
    averaged = aggregate_group(hetero, [1, 3], ALPHA, "factor-avg")
    padded = aggregate_group(hetero, [1, 3], ALPHA, "zero-pad")
    assert [state_digest(s) for s in averaged] == [state_digest(s) for s in padded]
    equal = [_adapter(rng, dict.fromkeys(MODULES, 4)) for _ in range(2)]
    b_mean = (equal[0][MODULES[0] + ".lora_B.weight"] + 3 * equal[1][MODULES[0] + ".lora_B.weight"]) / 4
    out = aggregate_group(equal, [1, 3], ALPHA, "factor-avg")[0]
    np.testing.assert_allclose(out[MODULES[0] + ".lora_B.weight"], b_mean, rtol=1e-5)


def test_dropped_clients_never_train_and_take_their_groups_model() -> None:
    ranks = [dict.fromkeys(MODULES, 4)] * 3
    pipe = _pipeline("fedavg", ranks, dropped=[2])
    assert pipe.trainers() == [0, 1]
    before = state_digest(pipe.state_for(2)[0])
    rng = np.random.default_rng(5)
    pipe.aggregate_train([Update(i, _adapter(rng, ranks[i]), _head(), 10) for i in (0, 1)])
    assert state_digest(pipe.state_for(2)[0]) != before
    assert state_digest(pipe.state_for(2)[0]) == state_digest(pipe.state_for(0)[0])


def test_self_prune_cuts_a_tail_that_shrank_and_keeps_one_that_grew() -> None:
    rng = np.random.default_rng(2)
    sent = _adapter(rng, {MODULES[0]: 8, MODULES[1]: 2})
    shrunk = {k: v.copy() for k, v in sent.items()}
    shrunk[MODULES[0] + ".lora_A.weight"][7:] *= 0.5  # floor(0.9 * 8) = 7 kept
    grown = {k: v.copy() for k, v in sent.items()}
    grown[MODULES[0] + ".lora_A.weight"][7:] *= 2.0
    assert self_prune(sent, shrunk, 0.9) == {MODULES[0]: 7}
    assert self_prune(sent, grown, 0.9) == {}
    assert self_prune(sent, shrunk, 1.0) == {}
    with pytest.raises(ValueError, match="gamma 0"):
        self_prune(sent, shrunk, 0)


def test_truncate_ranks_keeps_the_leading_components_dw_exactly() -> None:
    state = _adapter(np.random.default_rng(3), {MODULES[0]: 8})
    cut = truncate_ranks(state, {MODULES[0]: 3}, ALPHA)
    a, b = state[MODULES[0] + ".lora_A.weight"], state[MODULES[0] + ".lora_B.weight"]
    expected = lora_scaling(ALPHA, 8) * b[:, :3].astype(np.float64) @ a[:3].astype(np.float64)
    np.testing.assert_allclose(_dense(cut, MODULES[0]), expected, rtol=1e-5, atol=1e-6)
    assert module_ranks(cut) == {MODULES[0]: 3}


def test_hetlora_weights_updates_by_their_norm_and_prunes_the_clients_state() -> None:
    ranks = [dict.fromkeys(MODULES, 4), dict.fromkeys(MODULES, 8)]
    rng = np.random.default_rng(4)
    updates = [Update(i, _adapter(rng, ranks[i], scale=1.0 + 4 * i), _head(), 100 - 90 * i) for i in (0, 1)]
    pipe = _pipeline("hetlora", ranks, prune_gamma=1.0)  # gamma 1 keeps every rank: only the weights differ
    pipe.aggregate_train(updates)
    norms = [delta_norm(u.adapter, ALPHA) for u in updates]
    expected = aggregate_group([u.adapter for u in updates], norms, ALPHA, "zero-pad")
    assert state_digest(pipe.state_for(0)[0]) == state_digest(expected[0])
    by_rows = aggregate_group([u.adapter for u in updates], [100, 10], ALPHA, "zero-pad")
    assert state_digest(by_rows[0]) != state_digest(expected[0])

    pruning = _pipeline("hetlora", ranks, prune_gamma=0.5)
    sent = pruning.state_for(1)[0]
    tail_cut = {k: v * (0.1 if k.endswith("lora_A.weight") else 1.0) for k, v in sent.items()}
    pruning.aggregate_train([Update(1, tail_cut, _head(), 10)])
    assert module_ranks(pruning.state_for(1)[0]) == dict.fromkeys(MODULES, 4)
    assert pruning.pruned[1] == 8


def test_tail_penalty_is_the_product_of_tail_norms_and_pulls_only_the_tail() -> None:
    a = torch.randn(4, 3, requires_grad=True)
    b = torch.randn(5, 4, requires_grad=True)
    value = tail_penalty([(a, b)], 0.5)
    assert value.item() == pytest.approx((a[2:].norm() * b[:, 2:].norm()).item())
    value.backward()
    assert torch.all(a.grad[:2] == 0) and torch.all(b.grad[:, :2] == 0) and a.grad[2:].abs().sum() > 0
    assert tail_penalty([(torch.randn(1, 3), torch.randn(5, 1))], 0.9).item() == 0.0


def test_profiles_cycle_rank_tiers_with_memory_tiers() -> None:
    profiles = [profile_for(i, ["2GB", "4GB"], 0.5, [2, 4, 8]) for i in range(4)]
    assert [p.max_rank for p in profiles] == [2, 4, 8, 2]
    assert profiles[1].name == "4GBx0.5/r4" and profiles[1].memory_bytes == 2 * 10**9
    assert profile_for(0).max_rank == 0


@pytest.fixture()
def tiny_cfg(run_config: dict, tiny_models: dict[str, str]) -> dict:
    return run_config | {"model": tiny_models["bert"], "lora-rank": 4, "tasks": "sst2", "clients-per-task": 3}


def _clients(cfg: Config, budgets: list[int], caps: list[int]) -> list[ClientInfo]:
    return [
        ClientInfo(i, i, "sst2", 10, 10, device_profile=f"d{i}", memory_bytes=m, max_rank=c)
        for i, (m, c) in enumerate(zip(budgets, caps, strict=True))
    ]


@pytest.mark.parametrize("policy", ["shrink", "drop", "train"])
def test_over_budget_policies_plan_what_fits(tiny_cfg: dict, policy: str) -> None:
    cfg = Config.from_run_config(tiny_cfg | {"strategy": "fedavg", "over-budget": policy})
    shape, step = model_shape(cfg), train_shape(cfg)
    uniform = predict_peak_bytes(shape, step, [4] * shape.num_layers)["total"]
    # client 0: memory below the uniform plan; client 1: memory enough, rank cap 2; client 2: fits.
    clients = _clients(cfg, [int(uniform * 0.97), uniform * 2, uniform * 2], [0, 2, 0])
    plan = plan_federation(None, cfg, clients, resolve_switches("fedavg"))
    rows = plan.ranks
    if policy == "shrink":
        assert [r["plan"] for r in rows] == ["shrink", "shrink", "uniform"]
        assert all(r["fits-budget"] for r in rows) and rows[0]["predicted-peak-bytes"] <= int(uniform * 0.97)
        assert rows[1]["ranks-per-layer"] == "2 2"
        assert set(module_ranks(plan.initial[1][0]).values()) == {2}
        assert plan.frozen[0]  # a shrunk client holds its group's adapter on what it cannot train (frozen-layers use)
    elif policy == "drop":
        assert plan.dropped == [0, 1] and [r["plan"] for r in rows] == ["drop", "drop", "uniform"]
    else:
        assert plan.dropped == [] and [r["fits-budget"] for r in rows] == [False, True, True]


def test_common_ranks_give_every_client_one_plan_that_all_fit(tiny_cfg: dict) -> None:
    cfg = Config.from_run_config(tiny_cfg | {"strategy": "homlora"})
    shape, step = model_shape(cfg), train_shape(cfg)
    uniform = predict_peak_bytes(shape, step, [4] * shape.num_layers)["total"]
    clients = _clients(cfg, [int(uniform * 0.97), uniform * 2, uniform * 2], [0, 2, 0])
    plan = plan_federation(None, cfg, clients, resolve_switches("homlora"))
    assert len({r["ranks-per-layer"] for r in plan.ranks}) == 1
    assert all(r["fits-budget"] for r in plan.ranks) and not any(plan.frozen.values())
    assert max(int(x) for x in plan.ranks[0]["ranks-per-layer"].split()) <= 2
    floor = predict_peak_bytes(shape, step, [0] * shape.num_layers)["total"]
    with pytest.raises(AtlasError, match="no layer is adapted by every client"):
        plan_federation(None, cfg, _clients(cfg, [floor + 1] * 3, [0] * 3), resolve_switches("homlora"))


def test_energy_by_slice_splits_each_modules_spectrum_by_rank() -> None:
    rng = np.random.default_rng(6)
    u, _ = np.linalg.qr(rng.normal(size=(12, 4)))
    v, _ = np.linalg.qr(rng.normal(size=(10, 4)))
    sigma = np.array([4.0, 3.0, 2.0, 1.0])  # dW = s B A with B = U diag(sigma) / s, A = V^T
    state = {
        MODULES[0] + ".lora_A.weight": v.T,
        MODULES[0] + ".lora_B.weight": u * sigma / lora_scaling(ALPHA, 4),
        MODULES[1] + ".lora_A.weight": v[:, :1].T,
        MODULES[1] + ".lora_B.weight": u[:, :1] * 2.0 / lora_scaling(ALPHA, 1),
    }
    shares = energy_by_slice(state, ALPHA, [1, 2, 4])
    total = (sigma**2).sum() + 4.0
    np.testing.assert_allclose(shares, [(16 + 4) / total, 9 / total, 5 / total])
    assert energy_by_slice({k: 0 * v for k, v in state.items()}, ALPHA, [1, 2, 4]) == [0.0, 0.0, 0.0]


def test_sampling_sizes_like_flower_and_the_clients_that_sit_out_take_their_groups_model() -> None:
    ranks = [dict.fromkeys(MODULES, 4)] * 4
    pipe = _pipeline("fedavg", ranks)
    assert pipe.sample(1.0, 1, seed=0) == [0, 1, 2, 3]
    draws = {tuple(pipe.sample(0.5, 1, seed=s)) for s in range(20)}
    assert all(len(d) == 2 for d in draws) and len(draws) > 1 and pipe.sample(0.5, 1, 3) == pipe.sample(0.5, 1, 3)
    assert len(pipe.sample(0.1, 3, seed=0)) == 3  # min-train-nodes wins over int(0.1 x 4) = 0
    rng = np.random.default_rng(9)
    pipe.aggregate_train([Update(i, _adapter(rng, ranks[i]), _head(), 10) for i in (0, 1)], sat_out=[2])
    assert state_digest(pipe.state_for(2)[0]) == state_digest(pipe.state_for(0)[0])
    assert state_digest(pipe.state_for(3)[0]) != state_digest(pipe.state_for(0)[0])  # failed, not sampled out
    local = _pipeline("local-only", ranks)
    before = state_digest(local.state_for(2)[0])
    local.aggregate_train([Update(0, _adapter(rng, ranks[0]), _head(), 10)], sat_out=[2])
    assert state_digest(local.state_for(2)[0]) == before
