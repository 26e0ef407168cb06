"""Heterogeneous-rank LoRA aggregation: low-rank sums, exact truncation, baselines, state-dict entry point."""

from __future__ import annotations

import numpy as np
import pytest

from strategies.aggregation import (
    LORA_A_INIT_ROW_NORM,
    aggregate_exact,
    aggregate_factor_avg,
    aggregate_states,
    aggregate_svd_dense,
    aggregate_zero_pad,
    lora_scaling,
    lowrank_sum,
    refactor_state,
    server_step,
    to_factors,
)

D, L, ALPHA = 24, 16, 16.0
PREFIX = "base_model.model.encoder.layer.0.attention.self."


def _factors(ranks, seed=0, rslora=False):
    """Random (B, A, s) per rank, with PEFT's scaling for that rank."""
    rng = np.random.default_rng(seed)
    return [(rng.normal(size=(D, r)), rng.normal(size=(r, L)), lora_scaling(ALPHA, r, rslora)) for r in ranks]


def _dense(factors, weights):
    return sum(w * s * b @ a for w, (b, a, s) in zip(weights, factors, strict=True))


def _truncate(m, rank):
    u, s, vt = np.linalg.svd(m, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vt[:rank]


def _rel(x, y):
    return np.linalg.norm(x - y) / np.linalg.norm(y)


def _products(outputs, scalings):
    return [s * b @ a for (b, a), s in zip(outputs, scalings, strict=True)]


@pytest.mark.parametrize("rslora", [False, True])
def test_lowrank_sum_matches_dense_sum_for_mixed_ranks(rslora: bool) -> None:
    factors = _factors([2, 5, 8], rslora=rslora)
    weights = [0.7, 2.5, 0.1]  # deliberately not summing to 1: used as given
    lr = lowrank_sum(factors, weights)
    assert _rel(lr.dense(), _dense(factors, weights)) < 1e-6
    assert lr.U.shape == (D, 15) and lr.Vt.shape == (15, L) and np.all(np.diff(lr.S) <= 0)
    np.testing.assert_allclose(lr.U.T @ lr.U, np.eye(15), atol=1e-10)


def test_lowrank_sum_skips_zero_weights_and_rejects_bad_weights() -> None:
    factors = _factors([2, 3])
    assert lowrank_sum(factors, [0.0, 1.0]).S.shape == (3,)
    assert _rel(lowrank_sum(factors, [0.0, 1.0]).dense(), _dense(factors[1:], [1.0])) < 1e-10
    for bad in ([0, 0], [1, -1], [1]):
        with pytest.raises(ValueError, match="weight"):
            lowrank_sum(factors, bad)


def test_lowrank_sum_survives_gesdd_not_converging(monkeypatch, caplog) -> None:
    """numpy's gesdd gave up on one real round's core: the sum must come from gesvd, not crash the round."""
    factors, weights = _factors([2, 5, 8]), [0.5, 0.3, 0.2]

    def gesdd_gives_up(*args, **kwargs):
        raise np.linalg.LinAlgError("SVD did not converge")

    monkeypatch.setattr(np.linalg, "svd", gesdd_gives_up)
    lr = lowrank_sum(factors, weights)
    assert _rel(lr.dense(), _dense(factors, weights)) < 1e-6 and np.all(np.diff(lr.S) <= 0)
    assert "gesvd used" in caplog.text


def test_non_finite_factors_are_refused_by_client() -> None:
    factors = _factors([2, 3])
    factors[1][0][0, 0] = np.nan
    with pytest.raises(ValueError, match="client 1: B and A must be finite"):
        lowrank_sum(factors, [0.5, 0.5])


def test_to_factors_balances_and_pads() -> None:
    lr = lowrank_sum(_factors([2]), [1.0])
    b, a = to_factors(lr, 5, 0.5)
    assert b.shape == (D, 5) and a.shape == (5, L)
    assert not b[:, 2:].any() and not a[2:].any()
    assert _rel(0.5 * b @ a, lr.dense()) < 1e-10
    np.testing.assert_allclose(np.linalg.norm(b, axis=0)[:2], np.linalg.norm(a, axis=1)[:2])  # balanced split
    for rank in (0, min(D, L) + 1):
        with pytest.raises(ValueError, match=r"target rank must be an integer in \[1, 16\]"):
            to_factors(lr, rank, 1.0)


def test_exact_reproduces_weighted_mean_when_rank_suffices() -> None:
    factors = _factors([2, 4, 3], seed=1)
    weights = [10, 30, 60]
    mean = _dense(factors, np.array(weights) / 100)
    (b, a), (b2, a2) = aggregate_exact(factors, weights, [9, 12], [ALPHA / 9, ALPHA / 12])
    assert _rel(ALPHA / 9 * b @ a, mean) < 1e-6
    assert _rel(ALPHA / 12 * b2 @ a2, mean) < 1e-6


def test_exact_truncation_equals_dense_svd_truncation() -> None:
    factors = _factors([4, 8, 6], seed=2)
    weights = [1, 2, 3]
    mean = _dense(factors, np.array(weights) / 6)
    outs = aggregate_exact(factors, weights, [4, 8, 6], [ALPHA / 4, ALPHA / 8, ALPHA / 6])
    for r, prod in zip([4, 8, 6], _products(outs, [ALPHA / 4, ALPHA / 8, ALPHA / 6]), strict=True):
        assert _rel(prod, _truncate(mean, r)) < 1e-6


def test_clients_with_different_scalings_get_the_same_update() -> None:
    factors = _factors([2, 3], seed=3, rslora=True)
    ranks = [8, 4]
    scalings = [lora_scaling(ALPHA, r, True) for r in ranks]
    p8, p4 = _products(aggregate_exact(factors, [1, 1], ranks, scalings), scalings)
    mean = _dense(factors, [0.5, 0.5])
    assert _rel(p8, mean) < 1e-6
    assert _rel(p4, _truncate(mean, 4)) < 1e-6


def test_svd_dense_equals_exact() -> None:
    factors = _factors([3, 6, 2], seed=4)
    ranks, scalings = [2, 5, 11], [ALPHA / 2, ALPHA / 5, ALPHA / 11]
    exact = _products(aggregate_exact(factors, [3, 1, 2], ranks, scalings), scalings)
    dense = _products(aggregate_svd_dense(factors, [3, 1, 2], ranks, scalings), scalings)
    for x, y in zip(exact, dense, strict=True):
        assert _rel(x, y) < 1e-6


def test_zero_pad_matches_hand_computation() -> None:
    factors = _factors([1, 2], seed=5)
    (b1, a1, s1), (b2, a2, s2) = factors
    b_mean = np.hstack([0.25 * s1 * b1, np.zeros((D, 1))]) + 0.75 * s2 * b2
    a_mean = np.vstack([0.25 * a1, np.zeros((1, L))]) + 0.75 * a2
    (b, a), (bt, at) = aggregate_zero_pad(factors, [1, 3], [2, 1], [ALPHA / 2, ALPHA])
    np.testing.assert_allclose(ALPHA / 2 * b, b_mean)
    np.testing.assert_allclose(a, a_mean)
    np.testing.assert_allclose(ALPHA * bt @ at, b_mean[:, :1] @ a_mean[:1])


def test_product_of_averages_is_not_average_of_products() -> None:
    factors = _factors([4, 4], seed=6)
    mean = _dense(factors, [0.5, 0.5])
    exact = _products(aggregate_exact(factors, [1, 1], [8], [ALPHA / 8]), [ALPHA / 8])[0]
    naive = _products(aggregate_factor_avg(factors, [1, 1], [4], [ALPHA / 4]), [ALPHA / 4])[0]
    assert _rel(exact, mean) < 1e-6
    assert _rel(naive, mean) > 0.1


@pytest.mark.parametrize("seed", range(5))
def test_exact_is_never_worse_than_the_baselines(seed: int) -> None:
    rng = np.random.default_rng(seed)
    weights = rng.integers(1, 100, size=3)
    for ranks, target, baseline in [([4, 4, 4], 4, aggregate_factor_avg), ([2, 8, 5], 5, aggregate_zero_pad)]:
        factors = _factors(ranks, seed=seed)
        mean = _dense(factors, weights / weights.sum())
        s = ALPHA / target
        exact = _products(aggregate_exact(factors, weights, [target], [s]), [s])[0]
        other = _products(baseline(factors, weights, [target], [s]), [s])[0]
        assert np.linalg.norm(exact - mean) <= np.linalg.norm(other - mean) * (1 + 1e-9)


def test_factor_avg_needs_equal_ranks() -> None:
    with pytest.raises(ValueError, match=r"factor-avg needs equal ranks: got input ranks \[2, 4\]"):
        aggregate_factor_avg(_factors([2, 4]), [1, 1], [4, 4], [1.0, 1.0])
    with pytest.raises(ValueError, match="factor-avg needs equal ranks"):
        aggregate_factor_avg(_factors([4, 4]), [1, 1], [4, 2], [1.0, 1.0])


def _module_state(rng, modules: dict[str, tuple[int, int, int]]) -> dict[str, np.ndarray]:
    """A PEFT adapter state: module -> (out, in, r) gives lora_B (out, r) and lora_A (r, in), float32."""
    state = {}
    for name, (out, inp, r) in modules.items():
        state[PREFIX + name + ".lora_A.weight"] = rng.normal(size=(r, inp)).astype(np.float32)
        state[PREFIX + name + ".lora_B.weight"] = rng.normal(size=(out, r)).astype(np.float32)
    return state


def _two_clients(seed: int = 0):
    rng = np.random.default_rng(seed)
    return [
        _module_state(rng, {"query": (D, D, 2), "value": (D, L, 4)}),
        _module_state(rng, {"query": (D, D, 6), "value": (D, L, 3)}),
    ]


def _delta(state, module, alpha=ALPHA, rslora=False):
    b, a = state[PREFIX + module + ".lora_B.weight"], state[PREFIX + module + ".lora_A.weight"]
    return lora_scaling(alpha, a.shape[0], rslora) * b.astype(np.float64) @ a.astype(np.float64)


@pytest.mark.parametrize("method", ["exact", "svd-dense", "zero-pad"])
def test_aggregate_states_round_trip_keeps_keys_ranks_and_dtype(method: str) -> None:
    states = _two_clients()
    outs = aggregate_states(states, [1, 3], [{}, {PREFIX + "value": 7}], ALPHA, method)
    for state, out in zip(states, outs, strict=True):
        assert set(out) == set(state) and all(v.dtype == np.float32 for v in out.values())
    for key in states[0]:
        assert outs[0][key].shape == states[0][key].shape  # missing module: the client's own rank
    assert outs[1][PREFIX + "value.lora_A.weight"].shape == (7, L)
    assert outs[1][PREFIX + "value.lora_B.weight"].shape == (D, 7)
    if method != "zero-pad":
        mean = 0.25 * _delta(states[0], "value") + 0.75 * _delta(states[1], "value")
        assert _rel(_delta(outs[1], "value"), mean) < 1e-5  # rank 7 >= 4 + 3: no truncation
        assert _rel(_delta(outs[0], "value"), _truncate(mean, 4)) < 1e-5


def test_aggregate_states_rslora_uses_sqrt_scaling() -> None:
    states = _two_clients(1)
    outs = aggregate_states(
        states, [1, 1], [{PREFIX + "query": 8, PREFIX + "value": 7}], ALPHA, "exact", use_rslora=True
    )
    mean = 0.5 * _delta(states[0], "query", rslora=True) + 0.5 * _delta(states[1], "query", rslora=True)
    assert _rel(_delta(outs[0], "query", rslora=True), mean) < 1e-5


def test_aggregate_states_factor_avg_on_equal_ranks() -> None:
    rng = np.random.default_rng(2)
    states = [_module_state(rng, {"query": (D, D, 4)}) for _ in range(2)]
    outs = aggregate_states(states, [1, 1], [{}, {}], ALPHA, "factor-avg")
    key = PREFIX + "query.lora_A.weight"
    np.testing.assert_allclose(outs[0][key], 0.5 * (states[0][key] + states[1][key]), rtol=1e-6)
    with pytest.raises(ValueError, match="module .*query.*factor-avg needs equal ranks"):
        aggregate_states(states, [1, 1], [{PREFIX + "query": 2}, {}], ALPHA, "factor-avg")


def _bad_inputs():
    states = _two_clients()
    a_key, b_key = PREFIX + "query.lora_A.weight", PREFIX + "query.lora_B.weight"
    missing_b = [{k: v for k, v in s.items() if k != b_key} for s in states]
    extra = [{**s, "classifier.weight": np.zeros((2, D), np.float32)} for s in states]
    other_keys = [states[0], {k: v for k, v in states[1].items() if "value" not in k}]
    wrong_in = [states[0], {**states[1], a_key: np.zeros((6, D + 1), np.float32)}]
    wrong_r = [states[0], {**states[1], a_key: np.zeros((5, D), np.float32)}]
    good = [{}, {}]
    return [
        (missing_b, good, "exact", "has no partner"),
        (extra, good, "exact", "'classifier.weight' is not a LoRA factor"),
        (other_keys, good, "exact", "state 1 has keys"),
        (wrong_in, good, "exact", r"state 1: .*query.lora_A.weight.* has \(out, in\)"),
        (wrong_r, good, "exact", "query.lora_A.weight"),
        (states, good, "fedavg", "unknown aggregation method 'fedavg'"),
        (states, [{"query": 2}, {}], "exact", "target 0 names unknown module 'query'"),
        (states, [{}, {}, {}], "exact", "target 2 has no rank for"),
        (states, [{PREFIX + "query": 0}, {}], "exact", "module .*query.*rank must be >= 1: got 0"),
        (states, [{PREFIX + "value": 17}, {}], "exact", r"module .*value.*target rank must be an integer in \[1, 16\]"),
    ]


@pytest.mark.parametrize(("states", "targets", "method", "match"), _bad_inputs())
def test_aggregate_states_rejects_bad_inputs_in_one_line(states, targets, method, match) -> None:
    with pytest.raises(ValueError, match=match) as info:
        aggregate_states(states, [1, 1], targets, ALPHA, method)
    assert "\n" not in str(info.value)


def test_a_orthonormal_split_keeps_the_product_and_gives_a_peft_scaled_basis() -> None:
    lr = lowrank_sum(_factors([3, 5], seed=4), [0.5, 0.5])
    scaling = lora_scaling(ALPHA, 6)
    b_bal, a_bal = to_factors(lr, 6, scaling)
    b, a = to_factors(lr, 6, scaling, "a-orthonormal")
    assert _rel(scaling * b @ a, scaling * b_bal @ a_bal) < 1e-10
    # A's rows: orthogonal, each at the row norm PEFT's kaiming init gives; B carries the singular values.
    np.testing.assert_allclose(a @ a.T, LORA_A_INIT_ROW_NORM**2 * np.eye(6), atol=1e-10)
    assert not np.allclose(a, a_bal)
    with pytest.raises(ValueError, match="unknown factor split 'even'"):
        to_factors(lr, 6, scaling, "even")


def test_refactor_state_keeps_every_module_product() -> None:
    state = {}
    for name, r in (("query", 2), ("value", 5)):
        ((b, a, _),) = _factors([r], seed=r)
        state[PREFIX + name + ".lora_A.weight"] = a.astype(np.float32)
        state[PREFIX + name + ".lora_B.weight"] = b.astype(np.float32)
    out = refactor_state(state, ALPHA, "a-orthonormal")
    assert {k: v.shape for k, v in out.items()} == {k: v.shape for k, v in state.items()}
    for name in ("query", "value"):
        a0, b0 = (state[PREFIX + name + s].astype(np.float64) for s in (".lora_A.weight", ".lora_B.weight"))
        a1, b1 = (out[PREFIX + name + s].astype(np.float64) for s in (".lora_A.weight", ".lora_B.weight"))
        assert _rel(b1 @ a1, b0 @ a0) < 1e-5
        assert out[PREFIX + name + ".lora_A.weight"].dtype == np.float32


@pytest.mark.parametrize("lr", [0.5, 1.0, 2.5])
def test_server_step_in_dw_space_is_exact(lr: float) -> None:
    def state(seed):
        ((b, a, _),) = _factors([3], seed=seed)
        return {PREFIX + "query.lora_A.weight": a, PREFIX + "query.lora_B.weight": b}

    old, new = state(1), state(2)
    out = server_step(old, new, lr, ALPHA, "dw")
    a, b = out[PREFIX + "query.lora_A.weight"], out[PREFIX + "query.lora_B.weight"]
    dense = {
        k: lora_scaling(ALPHA, 3) * s[PREFIX + "query.lora_B.weight"] @ s[PREFIX + "query.lora_A.weight"]
        for k, s in (("old", old), ("new", new))
    }
    assert a.shape[0] == (3 if lr == 1.0 else 6)
    expected = dense["old"] + lr * (dense["new"] - dense["old"])
    assert _rel(lora_scaling(ALPHA, a.shape[0]) * b @ a, expected) < 1e-10
    # In factor space the step is element-wise.
    factors = server_step(old, new, lr, ALPHA, "factors")
    np.testing.assert_allclose(
        factors[PREFIX + "query.lora_A.weight"],
        old[PREFIX + "query.lora_A.weight"]
        + lr * (new[PREFIX + "query.lora_A.weight"] - old[PREFIX + "query.lora_A.weight"]),
    )
    with pytest.raises(ValueError, match="server lr must be finite and > 0: got 0"):
        server_step(old, new, 0, ALPHA, "dw")
