"""Task clustering of client fingerprints with an automatic number of groups (numpy + scikit-learn only).

Clients send fingerprint vectors (already projected and clipped client-side). The server groups them by
task *without* task labels: it fits a clustering for every candidate k, scores each fit with internal
validity indices, and picks k with :func:`choose_k`. True labels are used only by :func:`adjusted_rand`,
to evaluate a grouping after the fact.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from sklearn.cluster import AgglomerativeClustering, KMeans
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import (
    adjusted_rand_score,
    calinski_harabasz_score,
    davies_bouldin_score,
    silhouette_score,
)
from threadpoolctl import threadpool_limits  # a scikit-learn dependency

METHODS = ("kmeans", "agglomerative")
SCORE_NAMES = ("silhouette", "davies-bouldin", "calinski-harabasz")
#: Below this best silhouette the data is read as one blob (no task structure) when k=1 is allowed.
DEFAULT_MIN_SILHOUETTE = 0.25

Scores = Mapping[int, Mapping[str, float]]


@dataclass(frozen=True)
class ClusterResult:
    """The chosen grouping of clients.

    Attributes
    ----------
    labels : list of int
        One group id per client, canonical: groups are numbered by first appearance in client order.
    k : int
        Number of groups.
    scores : dict[int, dict[str, float]]
        For each k tried: ``silhouette`` (higher is better), ``davies-bouldin`` (lower is better) and
        ``calinski-harabasz`` (higher is better); NaN where a fit collapsed to fewer than 2 groups.
    rule : str
        Why this k was chosen, in words.
    method : str
        ``"kmeans"`` or ``"agglomerative"``.
    """

    labels: list[int]
    k: int
    scores: dict[int, dict[str, float]]
    rule: str
    method: str

    def to_dict(self) -> dict:
        """A JSON-ready dict (k keys become strings, NaN becomes None)."""
        scores = {
            str(k): {name: (None if math.isnan(v) else float(v)) for name, v in row.items()}
            for k, row in self.scores.items()
        }
        return {"labels": list(self.labels), "k": self.k, "scores": scores, "rule": self.rule, "method": self.method}


def choose_k(scores: Scores, min_silhouette: float = DEFAULT_MIN_SILHOUETTE, k_min: int = 1) -> int:
    """Pick the number of groups from per-k validity scores.

    Rule: take the k with the highest silhouette (ties: the smaller k). If that best silhouette is below
    ``min_silhouette`` and ``k_min <= 1``, answer k=1 instead: no grouping separates the clients clearly,
    so they form one group. Silhouette is undefined at k=1, which is why k=1 is reached only through this
    threshold. With no finite silhouette at all, the answer is 1 when ``k_min <= 1``.

    Parameters
    ----------
    scores : mapping int -> mapping str -> float
        Per k, at least the key ``"silhouette"``; NaN entries are ignored.
    min_silhouette : float
        Threshold under which the best grouping is not trusted.
    k_min : int
        Smallest k the caller accepts: smaller keys of ``scores`` are ignored, and k=1 is only possible
        when ``k_min <= 1``.

    Returns
    -------
    int
        The chosen k.
    """
    best_k, best = None, -math.inf
    for k in sorted(kk for kk in scores if kk >= max(2, k_min)):
        value = float(scores[k]["silhouette"])
        if not math.isnan(value) and value > best:  # strict: a tie keeps the smaller k
            best_k, best = k, value
    if k_min <= 1 and (best_k is None or best < min_silhouette):
        return 1
    if best_k is None:
        raise ValueError(f"no k in {sorted(scores)} has a defined silhouette and k_min={k_min} rules out k=1")
    return best_k


def cluster_fingerprints(
    fingerprints: np.ndarray | Sequence[Sequence[float]],
    k_min: int = 1,
    k_max: int | None = None,
    seed: int = 0,
    method: str = "kmeans",
    min_silhouette: float = DEFAULT_MIN_SILHOUETTE,
) -> ClusterResult:
    """Group clients by their fingerprints, choosing the number of groups automatically.

    Rows are L2-normalised first: a client's fingerprint scale depends on things unrelated to its task
    (data size, learning rate, clipping), while the direction carries the task. On unit vectors the squared
    Euclidean distance is ``2 - 2 cos``, so k-means and the scores below work in cosine geometry.

    Every k in ``[max(2, k_min), min(k_max or n-1, n-1)]`` is fitted (silhouette needs 2 <= k <= n-1) and
    scored; :func:`choose_k` picks k (see there for the rule, including when k=1 is answered).

    Parameters
    ----------
    fingerprints : array-like, shape (n_clients, dim)
        One finite, non-zero fingerprint per client.
    k_min, k_max : int
        Range of k allowed; ``k_max=None`` means n_clients - 1.
    seed : int
        Random state of k-means (same seed and input give the same labels).
    method : str
        ``"kmeans"`` (n_init=10) or ``"agglomerative"`` (average linkage, cosine).
    min_silhouette : float
        Below this best silhouette the answer is k=1 when ``k_min <= 1``.

    Returns
    -------
    ClusterResult
        Canonical labels, k, per-k scores and the rule applied.
    """
    x = _normalised(fingerprints)
    n = x.shape[0]
    lo, hi = _k_range(n, k_min, k_max)
    if method not in METHODS:
        raise ValueError(f"unknown clustering method {method!r}: expected one of {', '.join(METHODS)}")
    # A few dozen clients: OpenMP start-up costs more than it saves (about 10x slower on 2 busy cores).
    with threadpool_limits(1):
        fits = {k: _fit(x, k, seed, method) for k in range(lo, hi + 1)}
    scores = {k: _scores(x, labels) for k, labels in fits.items()}
    k = choose_k(scores, min_silhouette, k_min)
    labels = [0] * n if k == 1 else canonical_labels(fits[k])
    return ClusterResult(labels, k, scores, _explain(k, scores, (lo, hi), min_silhouette, k_min), method)


def canonical_labels(labels: Sequence[int] | np.ndarray) -> list[int]:
    """Renumber groups by first appearance in client order (``[2, 2, 0, 1] -> [0, 0, 1, 2]``).

    Parameters
    ----------
    labels : sequence of int
        Any group ids.

    Returns
    -------
    list of int
        The same partition with ids 0, 1, ... in order of first appearance.
    """
    mapping: dict[int, int] = {}
    return [mapping.setdefault(int(label), len(mapping)) for label in labels]


def adjusted_rand(labels_true: Sequence[int], labels_pred: Sequence[int]) -> float:
    """Adjusted Rand index between true task labels and a predicted grouping (1.0 = same partition).

    For evaluation only: :func:`cluster_fingerprints` never sees the true labels.

    Parameters
    ----------
    labels_true, labels_pred : sequence of int
        One label per client, same length.

    Returns
    -------
    float
        ARI, invariant to renaming groups; about 0 for a random grouping.
    """
    if len(labels_true) != len(labels_pred):
        raise ValueError(f"need one predicted label per true label: got {len(labels_pred)} and {len(labels_true)}")
    return float(adjusted_rand_score(list(labels_true), list(labels_pred)))


def _normalised(fingerprints: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    x = np.asarray(fingerprints, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2 or x.shape[1] < 1:
        raise ValueError(f"fingerprints must be a 2-D array with at least 2 clients: got shape {x.shape}")
    bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
    if bad.size:
        raise ValueError(f"fingerprints of clients {bad.tolist()[:5]} contain NaN or Inf: only finite values allowed")
    norms = np.linalg.norm(x, axis=1)
    zero = np.flatnonzero(norms == 0)
    if zero.size:
        raise ValueError(f"fingerprints of clients {zero.tolist()[:5]} are all zero: a direction is needed")
    return x / norms[:, None]


def _k_range(n: int, k_min: int, k_max: int | None) -> tuple[int, int]:
    """The k tried (possibly empty, lo > hi, when only k=1 remains)."""
    if k_min < 1 or (k_max is not None and k_max < k_min):
        raise ValueError(f"k range [{k_min}, {k_max}] is empty or below 1: need 1 <= k_min <= k_max")
    hi = n - 1 if k_max is None else min(k_max, n - 1)
    lo = max(2, k_min)
    if lo > hi and k_min > 1:
        raise ValueError(f"k_min={k_min} is not testable with {n} clients: silhouette needs k <= n_clients-1={n - 1}")
    return lo, hi


def _fit(x: np.ndarray, k: int, seed: int, method: str) -> np.ndarray:
    if method == "agglomerative":
        return AgglomerativeClustering(n_clusters=k, metric="cosine", linkage="average").fit_predict(x)
    with warnings.catch_warnings():
        # Duplicate fingerprints can leave fewer distinct points than k: the fit then merges groups,
        # which _scores reports as NaN rather than a warning.
        warnings.simplefilter("ignore", ConvergenceWarning)
        return KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(x)


def _scores(x: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    found = len(np.unique(labels))
    if not 2 <= found <= x.shape[0] - 1:
        return dict.fromkeys(SCORE_NAMES, math.nan)
    return {
        "silhouette": float(silhouette_score(x, labels)),
        "davies-bouldin": float(davies_bouldin_score(x, labels)),
        "calinski-harabasz": float(calinski_harabasz_score(x, labels)),
    }


def _explain(k: int, scores: Scores, k_range: tuple[int, int], min_silhouette: float, k_min: int) -> str:
    lo, hi = k_range
    if lo > hi:
        return "k=1: too few clients to compare groupings (silhouette needs 2 <= k <= n_clients-1)"
    finite = {kk: s["silhouette"] for kk, s in scores.items() if not math.isnan(s["silhouette"])}
    if not finite:
        return f"k=1: no k in {lo}..{hi} gave a defined silhouette"
    best_k = max(finite, key=lambda kk: (finite[kk], -kk))
    if k == 1:
        return (
            f"k=1: best silhouette {finite[best_k]:.3f} (k={best_k}) over k={lo}..{hi} "
            f"is below {min_silhouette}: no clear task structure"
        )
    if finite[k] < min_silhouette:
        return f"k={k}: highest silhouette {finite[k]:.3f} over k={lo}..{hi}, below {min_silhouette} but k_min={k_min}"
    return f"k={k}: highest silhouette {finite[k]:.3f} over k={lo}..{hi} (>= {min_silhouette}; ties go to smaller k)"
