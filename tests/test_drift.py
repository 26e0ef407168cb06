"""Client drift: the Gram matrix of the members' dW updates, from factors, against dense matrices."""

from __future__ import annotations

import numpy as np
import pytest

from strategies.aggregation import lora_scaling
from strategies.drift import drift, keep_length_factor, update_gram
from strategies.pipeline import Member, PersonalizedPipeline, Update, resolve_switches

ALPHA = 16.0
D, L = 9, 7
MODULES = ["layer.0.query", "layer.1.value"]


def _state(rng: np.random.Generator, ranks: dict[str, int]) -> dict[str, np.ndarray]:
    out = {}
    for module, r in ranks.items():
        out[module + ".lora_A.weight"] = rng.normal(size=(r, L)).astype(np.float32)
        out[module + ".lora_B.weight"] = rng.normal(size=(D, r)).astype(np.float32)
    return out


def _dense(state: dict[str, np.ndarray], module: str) -> np.ndarray:
    if module + ".lora_A.weight" not in state:
        return np.zeros((D, L))
    a = state[module + ".lora_A.weight"].astype(np.float64)
    b = state[module + ".lora_B.weight"].astype(np.float64)
    return lora_scaling(ALPHA, a.shape[0]) * b @ a


def test_gram_equals_the_dense_updates_inner_products_over_shared_modules() -> None:
    rng = np.random.default_rng(0)
    # Ranks differ between clients and between sent and returned; client 2 returns only module 0 (frozen
    # module 1), and client 1 was sent nothing for module 1 (a zero start).
    sent = [
        _state(rng, {MODULES[0]: 2, MODULES[1]: 4}),
        _state(rng, {MODULES[0]: 4}),
        _state(rng, dict.fromkeys(MODULES, 8)),
    ]
    returned = [_state(rng, {MODULES[0]: 2, MODULES[1]: 4}), _state(rng, {MODULES[0]: 4, MODULES[1]: 2}),
                _state(rng, {MODULES[0]: 8})]  # fmt: skip
    gram = update_gram(sent, returned, ALPHA)
    updates = [_dense(r, MODULES[0]) - _dense(s, MODULES[0]) for s, r in zip(sent, returned, strict=True)]
    expected = np.array([[np.sum(u * v) for v in updates] for u in updates])
    np.testing.assert_allclose(gram, expected, rtol=1e-9)
    # Without client 2 both modules are shared, and both count.
    gram2 = update_gram(sent[:2], returned[:2], ALPHA)
    both = [[_dense(r, m) - _dense(s, m) for m in MODULES] for s, r in zip(sent[:2], returned[:2], strict=True)]
    expected2 = np.array([[sum(np.sum(x * y) for x, y in zip(u, v, strict=True)) for v in both] for u in both])
    np.testing.assert_allclose(gram2, expected2, rtol=1e-9)


def test_drift_reads_agreement_orthogonality_and_opposition() -> None:
    same = np.array([[4.0, 4.0], [4.0, 4.0]])
    assert drift(same, [1, 3]) == pytest.approx({"cosine": 1.0, "kept": 1.0})
    orthogonal = np.diag([4.0, 4.0])
    assert drift(orthogonal, [1, 1]) == pytest.approx({"cosine": 0.0, "kept": 1 / np.sqrt(2)})
    opposite = np.array([[1.0, -1.0], [-1.0, 1.0]])
    assert drift(opposite, [1, 1]) == pytest.approx({"cosine": -1.0, "kept": 0.0}, abs=1e-12)
    assert np.isnan(drift(np.diag([1.0, 0.0]), [1, 1])["cosine"])  # a client that did not move
    with pytest.raises(ValueError, match="n >= 2"):
        drift(np.ones((1, 1)), [1])


def test_pipeline_reports_drift_inside_groups_only() -> None:
    rng = np.random.default_rng(1)
    ranks = {MODULES[0]: 2}
    members = [Member(0, "sst2", 0), Member(1, "sst2", 0), Member(2, "cola", 1), Member(3, "cola", 1)]
    head = {"weight": np.zeros((2, 3), np.float32), "bias": np.zeros(2, np.float32)}
    start = _state(rng, ranks)
    initial = {0: (start, head), 1: (start, head), 2: (_state(rng, ranks), head), 3: (_state(rng, ranks), head)}
    pipeline = PersonalizedPipeline("fedavg-cluster", resolve_switches("fedavg-cluster"), members, initial, ALPHA)
    trained = _state(rng, ranks)  # group 0: both clients start and end alike, so their updates agree
    adapters = [trained, trained, _state(rng, ranks), _state(rng, ranks)]
    updates = [Update(i, a, head, num_examples=10, metrics={"train-loss": 0.5}) for i, a in enumerate(adapters)]
    other = drift(update_gram([initial[2][0], initial[3][0]], adapters[2:], ALPHA), [1, 1])
    assert abs(other["cosine"]) < 0.9  # random updates: the mean below is not 1 by accident
    metrics = pipeline.aggregate_train(updates)
    assert metrics["update-cosine"] == pytest.approx((1.0 + other["cosine"]) / 2)
    assert metrics["update-kept"] == pytest.approx((1.0 + other["kept"]) / 2)
    assert metrics["update-cosine-sst2"] == pytest.approx(1.0)
    assert metrics["update-cosine-cola"] == pytest.approx(other["cosine"])
    # One group of every client (FedAvg): a task's cosine still counts only its own clients' pair.
    mixed = [Member(m.client_id, m.task, 0) for m in members]
    pooled = PersonalizedPipeline("fedavg", resolve_switches("fedavg"), mixed, initial, ALPHA).aggregate_train(updates)
    assert pooled["update-cosine-sst2"] == pytest.approx(1.0)
    assert pooled["update-cosine-cola"] == pytest.approx(other["cosine"])
    assert pooled["update-cosine"] != pytest.approx(metrics["update-cosine"])  # cross-task pairs count there
    # A group of one trainer has nothing to drift from: no key rather than a made-up value.
    single = [Member(i, "sst2", i) for i in range(4)]
    alone = PersonalizedPipeline("fedavg-cluster", resolve_switches("fedavg-cluster"), single, initial, ALPHA)
    assert "update-cosine" not in alone.aggregate_train(updates)


def test_keep_length_factor_gives_back_the_length_averaging_takes() -> None:
    assert keep_length_factor(np.array([[4.0, 4.0], [4.0, 4.0]]), [1, 1]) == pytest.approx(1.0)
    assert keep_length_factor(np.diag([4.0, 4.0]), [1, 1]) == pytest.approx(np.sqrt(2))
    assert keep_length_factor(np.array([[1.0, -1.0], [-1.0, 1.0]]), [1, 1]) == pytest.approx(np.sqrt(2))  # capped
    assert keep_length_factor(np.diag([1.0, 0.0]), [1, 1]) == 1.0  # a client that did not move: no rule
    assert keep_length_factor(np.ones((1, 1)), [1]) == 1.0


def test_keep_length_steps_a_group_as_far_as_its_members_moved_on_average() -> None:
    rng = np.random.default_rng(3)
    module = MODULES[0]
    a = rng.normal(size=(2, L)).astype(np.float32)
    start = {module + ".lora_A.weight": a, module + ".lora_B.weight": np.zeros((D, 2), np.float32)}
    b1 = rng.normal(size=(D, 2)).astype(np.float32)
    b2 = (0.5 * b1 + rng.normal(size=(D, 2))).astype(np.float32)  # agree in part: 1 < factor < sqrt(2)
    # A shared A keeps the mean at rank 2, so exact aggregation truncates nothing and dW is checkable.
    returned = [{module + ".lora_A.weight": a, module + ".lora_B.weight": b} for b in (b1, b2)]
    heads = [{"weight": rng.normal(size=(2, 3)).astype(np.float32), "bias": np.zeros(2, np.float32)} for _ in range(2)]
    head0 = {"weight": np.zeros((2, 3), np.float32), "bias": np.zeros(2, np.float32)}
    members = [Member(0, "cola", 0), Member(1, "cola", 0)]
    weights = [10, 30]
    lengths = {}
    for rule in ("fixed", "keep-length"):
        pipeline = PersonalizedPipeline(
            "atlas-no-laplacian", resolve_switches("atlas-no-laplacian"), members,
            {0: (start, head0), 1: (start, head0)}, ALPHA, server_lr_rule=rule,
        )  # fmt: skip
        updates = [Update(i, returned[i], heads[i], weights[i], {"train-loss": 0.5}) for i in range(2)]
        metrics = pipeline.aggregate_train(updates)
        adapter, head = pipeline.state_for(0)
        lengths[rule] = (np.linalg.norm(_dense(adapter, module)), np.linalg.norm(head["weight"]), metrics)
    w = np.array(weights) / sum(weights)
    mean_dw = sum(wi * np.linalg.norm(_dense(r, module)) for wi, r in zip(w, returned, strict=True))
    mean_head = sum(wi * np.linalg.norm(h["weight"]) for wi, h in zip(w, heads, strict=True))
    factor = lengths["keep-length"][2]["server-lr-applied"]
    assert 1.05 < factor < np.sqrt(2) - 0.05
    assert lengths["keep-length"][0] == pytest.approx(mean_dw, rel=1e-4)  # the mean update, at its members' length
    assert lengths["fixed"][0] == pytest.approx(mean_dw / factor, rel=1e-4)  # plain averaging: shorter
    assert lengths["keep-length"][1] == pytest.approx(mean_head, rel=1e-5)  # heads by their own updates
    assert "server-lr-applied" not in lengths["fixed"][2]
