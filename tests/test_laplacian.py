"""Laplacian personalization: the similarity graph and the smoothing step on LoRA updates."""

from __future__ import annotations

import numpy as np
import pytest

from strategies.aggregation import lora_scaling
from strategies.laplacian import laplacian_states, laplacian_step, similarity_graph

D, L, ALPHA = 24, 16, 16.0
RANKS = [2, 3, 4]
PREFIX = "base_model.model.encoder.layer.1.attention.self."
GRAPH = np.array([[0.0, 0.8, 0.2], [0.8, 0.0, 0.5], [0.2, 0.5, 0.0]])


def _factors(ranks=RANKS, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.normal(size=(D, r)), rng.normal(size=(r, L)), lora_scaling(ALPHA, r)) for r in ranks]


def _deltas(factors):
    return [s * b @ a for b, a, s in factors]


def _step(factors, graph, eta, lam, ranks):
    scalings = [lora_scaling(ALPHA, r) for r in ranks]
    out = laplacian_step(factors, graph, eta, lam, ranks, scalings)
    return [s * b @ a for (b, a), s in zip(out, scalings, strict=True)]


def test_similarity_graph_is_a_symmetric_kernel() -> None:
    f = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 3.0], [0.1, 0.1]])
    a = similarity_graph(f)
    np.testing.assert_array_equal(a, a.T)
    np.testing.assert_array_equal(np.diag(a), 0.0)
    off = a[~np.eye(4, dtype=bool)]
    assert np.all(off > 0) and np.all(off <= 1)
    assert a[0, 3] > a[0, 1] > a[0, 2]  # closer fingerprints, larger weight
    sq = np.array([1.0, 9.0, 0.02, 10.0, 0.82, 8.42])  # the six pairwise squared distances
    np.testing.assert_allclose(a[0, 1], np.exp(-1.0 / np.median(sq)))
    np.testing.assert_allclose(similarity_graph(f, sigma2=2.0)[0, 2], np.exp(-9.0 / 2.0))


def test_similarity_graph_degenerate_cases() -> None:
    np.testing.assert_array_equal(similarity_graph(np.ones((3, 5))), 1.0 - np.eye(3))  # median 0: sigma2 = 1
    np.testing.assert_array_equal(similarity_graph(np.ones((1, 5))), np.zeros((1, 1)))
    with pytest.raises(ValueError, match="sigma2 must be finite and > 0: got 0"):
        similarity_graph(np.eye(3), sigma2=0.0)
    with pytest.raises(ValueError, match=r"\(n, m\) array"):
        similarity_graph(np.ones(4))


def test_eta_zero_is_the_identity_on_updates() -> None:
    factors = _factors()
    for new, old in zip(_step(factors, GRAPH, 0.0, 1.0, RANKS), _deltas(factors), strict=True):
        np.testing.assert_allclose(new, old, atol=1e-6 * np.abs(old).max())


def test_step_is_the_laplacian_formula_when_rank_suffices() -> None:
    factors, eta, lam = _factors(seed=1), 0.3, 2.0
    old = _deltas(factors)
    new = _step(factors, GRAPH, eta, lam, [9, 9, 9])
    degree = GRAPH.sum(axis=1)
    for k in range(3):
        expected = (1 - eta * lam * degree[k]) * old[k] + eta * lam * sum(GRAPH[k, j] * old[j] for j in range(3))
        np.testing.assert_allclose(new[k], expected, atol=1e-9 * np.abs(expected).max())
    # A symmetric graph only moves mass between clients: the sum of updates is conserved.
    np.testing.assert_allclose(sum(new), sum(old), atol=1e-9 * np.abs(sum(old)).max())
    # Row k holds client k's neighbours: an asymmetric graph pins the convention.
    one_way = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    new = _step(factors, one_way, 0.5, 1.0, [9, 9, 9])
    np.testing.assert_allclose(new[0], 0.5 * old[0] + 0.5 * old[1], atol=1e-9 * np.abs(old[0]).max())
    np.testing.assert_allclose(new[1], old[1], atol=1e-9 * np.abs(old[1]).max())


def test_step_moves_each_update_toward_its_neighbours() -> None:
    factors, eta, lam = _factors(seed=2), 0.5, 1.0
    old = _deltas(factors)
    new = _step(factors, GRAPH, eta, lam, [9, 9, 9])
    for k in range(3):
        neighbours = sum(GRAPH[k, j] * old[j] for j in range(3)) / GRAPH[k].sum()
        before, after = np.linalg.norm(old[k] - neighbours), np.linalg.norm(new[k] - neighbours)
        np.testing.assert_allclose(after, (1 - eta * lam * GRAPH[k].sum()) * before, rtol=1e-9)
        assert after < before


def test_step_keeps_own_ranks_and_truncates_optimally() -> None:
    factors, eta, lam = _factors(seed=3), 0.4, 1.0
    scalings = [s for _, _, s in factors]
    out = laplacian_step(factors, GRAPH, eta, lam, RANKS, scalings)
    full = _step(factors, GRAPH, eta, lam, [9, 9, 9])
    for (b, a), r, s, target in zip(out, RANKS, scalings, full, strict=True):
        assert b.shape == (D, r) and a.shape == (r, L)
        u, sv, vt = np.linalg.svd(target, full_matrices=False)
        np.testing.assert_allclose(s * b @ a, (u[:, :r] * sv[:r]) @ vt[:r], atol=1e-9 * np.abs(target).max())


def test_isolated_client_is_untouched() -> None:
    graph = GRAPH.copy()
    graph[2, :] = graph[:, 2] = 0.0
    factors = _factors(seed=4)
    new = _step(factors, graph, 0.5, 1.0, RANKS)
    np.testing.assert_allclose(new[2], _deltas(factors)[2], atol=1e-9)
    assert not np.allclose(new[0], _deltas(factors)[0])


def test_step_bound_is_enforced() -> None:
    factors = _factors()
    max_degree = GRAPH.sum(axis=1).max()  # 1.3
    with pytest.raises(
        ValueError, match=r"eta \* lam \* max degree must be <= 1: got eta=1.0, lam=1.0, max degree 1.3"
    ):
        laplacian_step(factors, GRAPH, 1.0, 1.0, RANKS, [1.0] * 3)
    new = _step(factors, GRAPH, 1.0 / max_degree, 1.0, [9, 9, 9])  # exactly at the bound: allowed
    old = _deltas(factors)
    np.testing.assert_allclose(new[1], (0.8 * old[0] + 0.5 * old[2]) / 1.3, atol=1e-9)
    with pytest.raises(ValueError, match="eta and lam must be finite and >= 0"):
        laplacian_step(factors, GRAPH, -0.1, 1.0, RANKS, [1.0] * 3)
    with pytest.raises(ValueError, match=r"adjacency must be a finite, non-negative \(3, 3\) array"):
        laplacian_step(factors, GRAPH[:2, :2], 0.1, 1.0, RANKS, [1.0] * 3)


def _states(seed: int = 0):
    rng = np.random.default_rng(seed)
    shapes = {"query": (D, D), "output.dense": (D, L)}
    states = []
    for r in RANKS:
        state = {}
        for name, (out, inp) in shapes.items():
            state[PREFIX + name + ".lora_A.weight"] = rng.normal(size=(r, inp)).astype(np.float32)
            state[PREFIX + name + ".lora_B.weight"] = rng.normal(size=(out, r)).astype(np.float32)
        states.append(state)
    return states


def _delta(state, module):
    b, a = state[PREFIX + module + ".lora_B.weight"], state[PREFIX + module + ".lora_A.weight"]
    return lora_scaling(ALPHA, a.shape[0]) * b.astype(np.float64) @ a.astype(np.float64)


def test_laplacian_states_keeps_keys_ranks_and_identity_at_eta_zero() -> None:
    states = _states()
    same = laplacian_states(states, GRAPH, 0.0, 1.0, ALPHA)
    moved = laplacian_states(states, GRAPH, 0.5, 1.0, ALPHA)
    for state, out, out2 in zip(states, same, moved, strict=True):
        assert {k: v.shape for k, v in out.items()} == {k: v.shape for k, v in state.items()}
        assert all(v.dtype == np.float32 for v in out2.values())
        for module in ("query", "output.dense"):
            ref = _delta(state, module)
            np.testing.assert_allclose(_delta(out, module), ref, atol=1e-5 * np.abs(ref).max())
            assert not np.allclose(_delta(out2, module), ref, atol=1e-3)


def test_laplacian_states_names_the_module_on_error() -> None:
    with pytest.raises(ValueError, match="module .*output.dense.*max degree") as info:
        laplacian_states(_states(), GRAPH, 1.0, 1.0, ALPHA)
    assert "\n" not in str(info.value)
