"""The one round pipeline behind every method: presets, groups, per-client ranks, Laplacian, heads."""

from __future__ import annotations

import random

import numpy as np
import pytest

from atlas_flwr.common.state import module_ranks, state_digest
from strategies.aggregation import lora_scaling, weighted_average
from strategies.memory import ModelShape, TrainShape, predict_peak_bytes
from strategies.pipeline import (
    Member,
    PersonalizedPipeline,
    Update,
    aggregate_group,
    plan_groups,
    plan_ranks,
    resolve_switches,
)

ALPHA = 16.0
D, L = 12, 10  # out, in features of every module
MODULES = [f"base_model.model.encoder.layer.{i}.attention.self.query" for i in range(2)]
TASKS = ["sst2", "sst2", "cola", "cola"]


def _adapter(rng: np.random.Generator, ranks: dict[str, int]) -> dict[str, np.ndarray]:
    out = {}
    for module, r in ranks.items():
        out[module + ".lora_A.weight"] = rng.normal(size=(r, L)).astype(np.float32)
        out[module + ".lora_B.weight"] = rng.normal(size=(D, r)).astype(np.float32)
    return out


def _head(value: float) -> dict[str, np.ndarray]:
    return {"weight": np.full((2, 3), value, np.float32), "bias": np.full((2,), value, np.float32)}


def _dense(state: dict[str, np.ndarray], module: str) -> np.ndarray:
    a, b = state[module + ".lora_A.weight"].astype(np.float64), state[module + ".lora_B.weight"].astype(np.float64)
    return lora_scaling(ALPHA, a.shape[0]) * b @ a


def _pipeline(
    strategy: str,
    ranks: list[dict[str, int]],
    groups=None,
    eta=0.0,
    adjacency=None,
    server_lr=1.0,
    factor_split="balanced",
    **switches,
):
    rng = np.random.default_rng(0)
    members = [Member(i, t, g) for i, (t, g) in enumerate(zip(TASKS, groups or [0, 0, 1, 1], strict=True))]
    initial = {i: (_adapter(rng, ranks[i]), _head(0.0)) for i in range(4)}
    if adjacency is None:
        adjacency = np.array([[0, 1, 0.2, 0.1], [1, 0, 0.3, 0.2], [0.2, 0.3, 0, 1], [0.1, 0.2, 1, 0]], float)
    return PersonalizedPipeline(
        strategy,
        resolve_switches(strategy, **switches),
        members,
        initial,
        ALPHA,
        adjacency,
        eta,
        server_lr=server_lr,
        factor_split=factor_split,
    )


def _updates(ranks: list[dict[str, int]], seed: int = 1) -> list[Update]:
    rng = np.random.default_rng(seed)
    return [
        Update(i, _adapter(rng, ranks[i]), _head(float(i + 1)), num_examples=10 * (i + 1), metrics={"train-loss": 0.5})
        for i in range(4)
    ]


UNIFORM = [dict.fromkeys(MODULES, 4)] * 4
HETERO = [{MODULES[0]: 2, MODULES[1]: 4}, {MODULES[1]: 8}, {MODULES[0]: 4, MODULES[1]: 8}, {MODULES[1]: 2}]


def test_presets_and_overrides() -> None:
    assert resolve_switches("atlas").laplacian and resolve_switches("atlas").aggregation == "exact"
    assert resolve_switches("fedavg").clustering == "none"
    assert resolve_switches("atlas", aggregation="zero-pad").aggregation == "zero-pad"
    assert not resolve_switches("atlas-no-laplacian").laplacian
    with pytest.raises(ValueError, match="unknown strategy 'fedprox'"):
        resolve_switches("fedprox")
    with pytest.raises(ValueError, match="unknown ranks 'dense'"):
        resolve_switches("atlas", ranks="dense")


def test_fedavg_gives_every_client_the_factor_average_and_task_heads() -> None:
    pipe = _pipeline("fedavg", UNIFORM, groups=[0, 0, 0, 0])
    updates = _updates(UNIFORM)
    pipe.aggregate_train(updates)
    expected = weighted_average([u.adapter for u in updates], [u.num_examples for u in updates])
    for i in range(4):
        for key, value in expected.items():
            np.testing.assert_allclose(pipe.state_for(i)[0][key], value, rtol=1e-6)
    sst2_head = weighted_average([updates[0].head, updates[1].head], [10, 20])
    np.testing.assert_allclose(pipe.state_for(1)[1]["weight"], sst2_head["weight"])
    assert not np.allclose(pipe.state_for(0)[1]["weight"], pipe.state_for(2)[1]["weight"])


def test_local_only_keeps_each_clients_own_update() -> None:
    pipe = _pipeline("local-only", UNIFORM)
    updates = _updates(UNIFORM)
    pipe.aggregate_train(updates)
    for u in updates:
        adapter, head = pipe.state_for(u.client_id)
        assert state_digest(adapter, head) == state_digest(u.adapter, u.head)


def test_exact_aggregation_stays_inside_each_group_at_each_clients_ranks() -> None:
    pipe = _pipeline("atlas-no-laplacian", HETERO)
    updates = _updates(HETERO)
    pipe.aggregate_train(updates)
    # Group 0 = clients 0, 1. Module 0 is held by client 0 only; module 1 by both.
    target = (10 * _dense(updates[0].adapter, MODULES[1]) + 20 * _dense(updates[1].adapter, MODULES[1])) / 30
    # Group 1 = clients 2, 3: it never sees group 0.
    target1 = (30 * _dense(updates[2].adapter, MODULES[1]) + 40 * _dense(updates[3].adapter, MODULES[1])) / 70
    for cid, mean in ((0, target), (1, target), (2, target1), (3, target1)):
        state = pipe.state_for(cid)[0]
        assert module_ranks(state) == HETERO[cid]
        r = HETERO[cid][MODULES[1]]
        u, s, vt = np.linalg.svd(mean)
        best = (u[:, :r] * s[:r]) @ vt[:r]  # the best rank-r approximation of the group's mean update
        np.testing.assert_allclose(_dense(state, MODULES[1]), best, atol=1e-4)
    # A module held by one client is that client's own update (nothing averaged in as zero).
    np.testing.assert_allclose(
        _dense(pipe.state_for(0)[0], MODULES[0]), _dense(updates[0].adapter, MODULES[0]), atol=1e-5
    )


def test_laplacian_moves_weights_and_eta_zero_is_exactly_no_laplacian() -> None:
    runs = {}
    for name, strategy, eta in (("off", "atlas-no-laplacian", 0.5), ("zero", "atlas", 0.0), ("on", "atlas", 0.5)):
        pipe = _pipeline(strategy, HETERO, eta=eta)
        pipe.aggregate_train(_updates(HETERO))
        runs[name] = [state_digest(pipe.state_for(i)[0]) for i in range(4)]
    assert runs["off"] == runs["zero"]
    assert all(a != b for a, b in zip(runs["off"], runs["on"], strict=True))


def _best(mean: np.ndarray, rank: int) -> np.ndarray:
    u, s, vt = np.linalg.svd(mean)
    return (u[:, :rank] * s[:rank]) @ vt[:rank]


def test_laplacian_mixes_untruncated_group_means_and_truncates_once() -> None:
    updates = _updates(HETERO)
    m = MODULES[1]  # every client holds it, at ranks 4, 8 | 8, 2
    means = [
        (10 * _dense(updates[0].adapter, m) + 20 * _dense(updates[1].adapter, m)) / 30,
        (30 * _dense(updates[2].adapter, m) + 40 * _dense(updates[3].adapter, m)) / 70,
    ]
    in_group = np.array([[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]], float)
    plain = _pipeline("atlas-no-laplacian", HETERO)
    plain.aggregate_train(updates)
    runs = {}
    for kind in ("aggregate", "held"):
        pipe = _pipeline("atlas", HETERO, eta=0.5, adjacency=in_group)
        pipe.laplacian_input = kind
        pipe.aggregate_train(updates)
        runs[kind] = pipe
    for cid in range(4):  # in-group edges join clients that hold one mean: they move nothing
        state = runs["aggregate"].state_for(cid)[0]
        assert module_ranks(state) == HETERO[cid]
        np.testing.assert_allclose(_dense(state, m), _dense(plain.state_for(cid)[0], m), atol=1e-4)
    # Mixing what clients hold pulls client 2 (rank 8) toward client 3's rank-2 truncation: its tail halves.
    held = _dense(runs["held"].state_for(2)[0], m)
    np.testing.assert_allclose(held, (_best(means[1], 8) + _best(means[1], 2)) / 2, atol=1e-4)
    assert np.linalg.norm(held - _best(means[1], 8)) > 0.03 * np.linalg.norm(means[1])
    # With edges across groups, client k gets the best rank-r_k approximation of its mix of the means.
    graph = np.array([[0, 1, 0.2, 0.1], [1, 0, 0.3, 0.2], [0.2, 0.3, 0, 1], [0.1, 0.2, 1, 0]], float)
    pipe = _pipeline("atlas", HETERO, eta=0.5, adjacency=graph)
    pipe.aggregate_train(updates)
    step = 0.5 / graph.sum(axis=1).max()
    for cid, group in ((0, 0), (1, 0), (2, 1), (3, 1)):
        others = [means[1 - group] if g != group else means[group] for g in (0, 0, 1, 1)]
        mix = (1 - step * graph[cid].sum()) * means[group] + step * sum(
            a * o for a, o in zip(graph[cid], others, strict=True)
        )
        np.testing.assert_allclose(_dense(pipe.state_for(cid)[0], m), _best(mix, HETERO[cid][m]), atol=1e-4)


def test_laplacian_pulls_clients_of_different_groups_together() -> None:
    def gap(strategy: str) -> float:
        pipe = _pipeline(strategy, UNIFORM, eta=1.0)
        pipe.aggregate_train(_updates(UNIFORM))
        return float(
            np.linalg.norm(_dense(pipe.state_for(0)[0], MODULES[1]) - _dense(pipe.state_for(2)[0], MODULES[1]))
        )

    assert gap("atlas") < gap("atlas-no-laplacian")


def test_cluster_scaled_graph_keeps_close_groups_and_drops_distant_ones() -> None:
    from strategies.pipeline import fingerprint_graph

    rng = np.random.default_rng(0)
    centres = np.eye(3)[[0, 0, 1, 1, 2, 2]]  # three groups far apart
    centres[4:] = centres[0] + 0.02 * centres[4]  # ... but the third sits near the first
    prints = centres + 0.01 * rng.normal(size=centres.shape)
    groups = [0, 0, 1, 1, 2, 2]
    wide, tight = fingerprint_graph(prints), fingerprint_graph(prints, groups, "cluster")
    assert wide[0, 2] > 0.05 and tight[0, 2] < 1e-6  # distant groups: no pull under the cluster scale
    assert tight[0, 4] > 1e-3 and tight[0, 4] > 1e3 * tight[0, 2]  # a near group keeps a pull
    inside = np.median([tight[0, 1], tight[2, 3], tight[4, 5]])
    assert abs(inside - np.exp(-1)) < 0.2  # a group's own pairs sit near the bandwidth
    single = fingerprint_graph(prints[[0, 2, 4]], [0, 1, 2], "cluster")  # no pair inside a group
    np.testing.assert_allclose(single, fingerprint_graph(prints[[0, 2, 4]]))
    with pytest.raises(ValueError, match="unknown laplacian graph 'knn'"):
        fingerprint_graph(prints, groups, "knn")


def test_result_does_not_depend_on_reply_order() -> None:
    updates = _updates(HETERO, seed=3)
    shuffled = updates[:]
    random.Random(1).shuffle(shuffled)
    a, b = _pipeline("atlas", HETERO, eta=0.5), _pipeline("atlas", HETERO, eta=0.5)
    a.aggregate_train(updates)
    b.aggregate_train(shuffled)
    assert all(state_digest(*a.state_for(i)) == state_digest(*b.state_for(i)) for i in range(4))


def test_heads_are_per_group_and_never_cross_groups() -> None:
    pipe = _pipeline("fedavg-cluster", UNIFORM, groups=[0, 1, 1, 0])  # groups that cut across tasks
    updates = _updates(UNIFORM)
    pipe.aggregate_train(updates)
    group0 = weighted_average([updates[0].head, updates[3].head], [10, 40])
    np.testing.assert_allclose(pipe.state_for(3)[1]["weight"], group0["weight"])
    np.testing.assert_allclose(pipe.state_for(0)[1]["weight"], group0["weight"])
    assert not np.allclose(pipe.state_for(1)[1]["weight"], group0["weight"])


def test_clients_without_an_update_keep_their_adapter_but_share_their_groups_head() -> None:
    pipe = _pipeline("fedavg-cluster", UNIFORM)
    before = state_digest(pipe.state_for(3)[0])
    metrics = pipe.aggregate_train(_updates(UNIFORM)[:3])
    assert metrics["num-examples"] == 60
    assert state_digest(pipe.state_for(3)[0]) == before
    np.testing.assert_allclose(pipe.state_for(3)[1]["weight"], pipe.state_for(2)[1]["weight"])


def test_zero_pad_and_exact_differ_on_heterogeneous_ranks() -> None:
    updates = _updates(HETERO)
    states, weights = [u.adapter for u in updates[:2]], [10, 20]
    exact = aggregate_group(states, weights, ALPHA, "exact")
    padded = aggregate_group(states, weights, ALPHA, "zero-pad")
    assert state_digest(exact[1]) != state_digest(padded[1])


def test_plan_groups() -> None:
    assert plan_groups("none", TASKS, None, 4, 0) == ([0, 0, 0, 0], None)
    assert plan_groups("oracle", ["b", "a", "b", "a"], None, 4, 0)[0] == [0, 1, 0, 1]
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(2, 16))
    prints = np.stack([centres[i // 3] + 0.05 * rng.normal(size=16) for i in range(6)])
    groups, result = plan_groups("learned", ["x"] * 6, prints, 4, 0)
    assert groups == [0, 0, 0, 1, 1, 1] and result.k == 2
    with pytest.raises(ValueError, match="needs fingerprints"):
        plan_groups("learned", TASKS, None, 4, 0)


SHAPE = ModelShape(
    num_layers=4,
    hidden=64,
    intermediate=256,
    num_heads=4,
    vocab=1000,
    max_positions=128,
    lora_targets_per_layer=((64, 64), (64, 64)),
    target_names=("query", "value"),
)
STEP = TrainShape(batch=8, seq_len=64)
LAYERS = [[f"layer.{i}.query", f"layer.{i}.value"] for i in range(4)]


def test_plan_ranks_binds_on_a_small_budget_and_fits_it() -> None:
    full = predict_peak_bytes(SHAPE, STEP, [8] * 4)["total"]
    importance = [1.0, 1.0, 1.0, 1.0]
    small, pattern = plan_ranks(SHAPE, STEP, int(full * 0.8), importance, LAYERS, 8)
    big, big_pattern = plan_ranks(SHAPE, STEP, full * 2, importance, LAYERS, 8)
    assert small.binding and small.predicted["total"] <= full * 0.8
    assert small.ranks[0] == 0 and small.ranks[-1] > 0  # the shallow layer is dropped first: it costs activations
    assert big.ranks == [8] * 4 and len(big_pattern) == 8
    assert set(pattern) == {m for i, r in enumerate(small.ranks) if r for m in LAYERS[i]}
    floor = predict_peak_bytes(SHAPE, STEP, [0] * 4)["total"]
    with pytest.raises(ValueError, match="fits no LoRA layer"):
        plan_ranks(SHAPE, STEP, floor + 1, importance, LAYERS, 8)


@pytest.mark.parametrize("aggregation", ["exact", "factor-avg"])
def test_server_lr_steps_each_group_from_the_states_it_sent(aggregation: str) -> None:
    pipe = _pipeline("atlas-no-laplacian", UNIFORM, server_lr=2.0, aggregation=aggregation)
    sent = {i: pipe.state_for(i) for i in range(4)}
    updates = _updates(UNIFORM)
    pipe.aggregate_train(updates)
    for group in ([0, 1], [2, 3]):
        p = np.array([updates[i].num_examples for i in group], float)
        p /= p.sum()
        for module in MODULES:
            got = _dense(pipe.adapters[group[0]], module)
            if aggregation == "exact":  # dW space: the truncated SVD of old + 2 (new - old), averaged
                stepped = sum(
                    pk * (2 * _dense(updates[i].adapter, module) - _dense(sent[i][0], module))
                    for pk, i in zip(p, group, strict=True)
                )
                u, sv, vt = np.linalg.svd(stepped)
                expected = (u[:, :4] * sv[:4]) @ vt[:4]
            else:  # factor space: each factor is stepped, then averaged
                a, b = (
                    sum(
                        pk * (2 * updates[i].adapter[module + suffix] - sent[i][0][module + suffix])
                        for pk, i in zip(p, group, strict=True)
                    )
                    for suffix in (".lora_A.weight", ".lora_B.weight")
                )
                expected = lora_scaling(ALPHA, 4) * b.astype(np.float64) @ a.astype(np.float64)
            np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
        # Heads step alike: the sent heads are 0 and client i returns i + 1.
        head = sum(pk * 2 * (i + 1) for pk, i in zip(p, group, strict=True))
        np.testing.assert_allclose(pipe.heads[group[1]]["weight"], head, rtol=1e-6)


def test_factor_split_changes_the_factors_not_the_products() -> None:
    balanced, orthonormal = (
        _pipeline("atlas", HETERO, eta=0.5, factor_split=split) for split in ("balanced", "a-orthonormal")
    )
    for pipe in (balanced, orthonormal):
        pipe.aggregate_train(_updates(HETERO))
    for i in range(4):
        for module in module_ranks(balanced.adapters[i]):
            np.testing.assert_allclose(
                _dense(orthonormal.adapters[i], module), _dense(balanced.adapters[i], module), rtol=1e-4, atol=1e-5
            )
            a = orthonormal.adapters[i][module + ".lora_A.weight"].astype(np.float64)
            np.testing.assert_allclose(np.linalg.norm(a, axis=1), np.sqrt(1 / 3), rtol=1e-5)
            assert not np.allclose(a, balanced.adapters[i][module + ".lora_A.weight"])
