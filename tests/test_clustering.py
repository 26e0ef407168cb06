"""Task clustering of client fingerprints: k chosen automatically, canonical labels, clear errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from strategies.clustering import (
    ClusterResult,
    adjusted_rand,
    canonical_labels,
    choose_k,
    cluster_fingerprints,
)


def _groups(sizes: list[int], dim: int = 32, noise: float = 0.3, seed: int = 0) -> tuple[np.ndarray, list[int]]:
    """Clients around random task directions (nearly orthogonal in 32-d), each with its own scale."""
    rng = np.random.default_rng(seed)
    rows, labels = [], []
    for task, size in enumerate(sizes):
        center = rng.normal(size=dim)
        for _ in range(size):
            # The per-client scale mimics different data sizes: normalisation must ignore it.
            rows.append(rng.uniform(0.5, 5.0) * (center + noise * rng.normal(size=dim)))
            labels.append(task)
    return np.array(rows), labels


def _interleaved(x: np.ndarray, labels: list[int], seed: int = 1) -> tuple[np.ndarray, list[int]]:
    order = np.random.default_rng(seed).permutation(len(labels))
    return x[order], [labels[i] for i in order]


@pytest.mark.parametrize("method", ["kmeans", "agglomerative"])
def test_four_separated_tasks_are_found(method: str) -> None:
    x, truth = _interleaved(*_groups([3, 3, 3, 3]))
    result = cluster_fingerprints(x, method=method)
    assert result.k == 4
    assert adjusted_rand(truth, result.labels) == 1.0
    assert set(result.scores) == set(range(2, 12))
    assert result.method == method and result.rule.startswith("k=4")
    assert result.scores[4]["silhouette"] > 0.5
    assert result.scores[4]["davies-bouldin"] < result.scores[2]["davies-bouldin"]


def test_unequal_group_sizes() -> None:
    x, truth = _interleaved(*_groups([5, 2, 3, 2]))
    result = cluster_fingerprints(x)
    assert result.k == 4
    assert adjusted_rand(truth, result.labels) == 1.0


def test_single_blob_gives_one_group() -> None:
    x, _ = _groups([10])
    result = cluster_fingerprints(x)
    assert result.k == 1
    assert result.labels == [0] * 10
    assert "below 0.25" in result.rule
    assert max(s["silhouette"] for s in result.scores.values()) < 0.25


def test_single_blob_with_k_min_two_is_forced_to_split() -> None:
    result = cluster_fingerprints(_groups([10])[0], k_min=2)
    assert result.k >= 2
    assert "k_min=2" in result.rule


def test_identical_runs_identical_labels_and_canonical() -> None:
    x, _ = _interleaved(*_groups([3, 3, 3, 3]))
    first, second = cluster_fingerprints(x, seed=7), cluster_fingerprints(x, seed=7)
    assert first == second
    # Canonical: client 0 is in group 0 and each new group gets the next id.
    seen: list[int] = []
    for label in first.labels:
        if label not in seen:
            assert label == len(seen)
            seen.append(label)


def test_canonical_labels() -> None:
    assert canonical_labels([2, 2, 0, 1, 0]) == [0, 0, 1, 2, 1]
    assert canonical_labels(np.array([5, 3, 5])) == [0, 1, 0]
    assert canonical_labels([]) == []


def test_k_max_and_two_clients() -> None:
    x, _ = _groups([3, 3, 3, 3])
    assert set(cluster_fingerprints(x, k_max=3).scores) == {2, 3}
    two = cluster_fingerprints(x[:2])
    assert (two.k, two.labels, two.scores) == (1, [0, 0], {})
    assert cluster_fingerprints(x, k_max=1).k == 1


def test_choose_k_rule() -> None:
    def scores(sil: dict[int, float]) -> dict[int, dict[str, float]]:
        return {k: {"silhouette": v} for k, v in sil.items()}

    assert choose_k(scores({2: 0.4, 3: 0.7, 4: 0.5})) == 3
    assert choose_k(scores({2: 0.6, 3: 0.6, 4: 0.5})) == 2  # tie: the smaller k
    assert choose_k(scores({2: 0.2, 3: 0.1})) == 1  # below 0.25: one group
    assert choose_k(scores({2: 0.2, 3: 0.1}), k_min=2) == 2  # k=1 ruled out
    assert choose_k(scores({2: 0.2, 3: 0.1}), min_silhouette=0.15) == 2
    assert choose_k(scores({2: math.nan, 3: 0.3})) == 3
    assert choose_k(scores({2: 0.9, 3: 0.3}), k_min=3) == 3
    assert choose_k({}) == 1
    with pytest.raises(ValueError, match="k_min=2"):
        choose_k(scores({2: math.nan}), k_min=2)


def test_to_dict_is_json() -> None:
    result = ClusterResult([0, 0, 1], 2, {2: {"silhouette": math.nan, "davies-bouldin": 1.0}}, "r", "kmeans")
    data = json.loads(json.dumps(result.to_dict()))
    assert data == {
        "labels": [0, 0, 1],
        "k": 2,
        "scores": {"2": {"silhouette": None, "davies-bouldin": 1.0}},
        "rule": "r",
        "method": "kmeans",
    }


def test_adjusted_rand() -> None:
    assert adjusted_rand([0, 0, 1, 1], [1, 1, 0, 0]) == 1.0
    assert adjusted_rand([0, 0, 1, 1], [0, 1, 0, 1]) < 0.1
    with pytest.raises(ValueError, match="one predicted label"):
        adjusted_rand([0, 1], [0])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"fingerprints": [[1.0, 2.0]]}, "at least 2 clients"),
        ({"fingerprints": [1.0, 2.0, 3.0]}, "2-D array"),
        ({"fingerprints": [[1.0, math.nan], [1.0, 0.0], [0.0, 1.0]]}, r"clients \[0\] contain NaN or Inf"),
        ({"fingerprints": [[1.0, 0.0], [math.inf, 0.0], [0.0, 1.0]]}, "NaN or Inf"),
        ({"fingerprints": [[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]]}, "all zero"),
        ({"k_min": 3, "k_max": 2}, r"k range \[3, 2\] is empty"),
        ({"k_min": 0}, "below 1"),
        ({"k_min": 12}, "k_min=12 is not testable with 12 clients"),
        ({"method": "dbscan"}, "unknown clustering method 'dbscan': expected one of kmeans, agglomerative"),
    ],
)
def test_bad_inputs(kwargs: dict, match: str) -> None:
    kwargs.setdefault("fingerprints", _groups([3, 3, 3, 3])[0])
    with pytest.raises(ValueError, match=match):
        cluster_fingerprints(**kwargs)
