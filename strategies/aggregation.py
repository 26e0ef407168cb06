"""Aggregation math on plain numpy states (no Flower imports): tested alone, fast."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import scipy.linalg

from atlas_flwr.common.state import LORA_A_SUFFIX, LORA_B_SUFFIX, State


def weighted_average(states: Sequence[State], weights: Sequence[float]) -> dict[str, np.ndarray]:
    """Element-wise average of states with the same keys and shapes, weighted by ``weights``.

    Parameters
    ----------
    states : sequence of dict[str, ndarray]
        One state per client; all with identical keys and shapes.
    weights : sequence of float
        Non-negative weights (e.g. ``num-examples``), not all zero.

    Returns
    -------
    dict[str, ndarray]
        sum_k w_k x_k / sum_k w_k, in float32 (or the inputs' float dtype).
    """
    if not states or len(states) != len(weights):
        raise ValueError(f"need one weight per state: got {len(states)} states and {len(weights)} weights")
    w = np.asarray(weights, dtype=np.float64)
    if np.any(w < 0) or not np.isfinite(w).all() or w.sum() <= 0:
        raise ValueError(f"weights must be finite, non-negative and not all zero: got {w.tolist()}")
    w = w / w.sum()
    keys = set(states[0])
    out: dict[str, np.ndarray] = {}
    for i, state in enumerate(states):
        if set(state) != keys:
            raise ValueError(f"state {i} has keys {sorted(set(state) ^ keys)[:3]} that state 0 does not share")
    for key in sorted(keys):
        first = states[0][key]
        shapes = {tuple(s[key].shape) for s in states}
        if len(shapes) != 1:
            raise ValueError(f"tensor {key!r} has different shapes across states: {sorted(shapes)}")
        acc = np.zeros(first.shape, dtype=np.float64)
        for wk, state in zip(w, states, strict=True):
            acc += wk * state[key]
        out[key] = acc.astype(first.dtype if np.issubdtype(first.dtype, np.floating) else np.float32)
    return out


# --- Heterogeneous-rank LoRA aggregation -------------------------------------------------------------------------
#
# A client's update to one adapted module is dW = s * B @ A (B: d x r, A: r x l, s = alpha / r, or alpha / sqrt(r)
# with rsLoRA). Clients may hold different ranks, so their factors cannot be averaged directly; the functions below
# work on (B, A, s) triples and never form a dense d x l matrix unless named "dense".

Factor = tuple[np.ndarray, np.ndarray, float]
"""One client's LoRA factors for one module: ``(B, A, s)`` with ``dW = s * B @ A``."""

AGGREGATION_METHODS = ("exact", "zero-pad", "svd-dense", "factor-avg")


@dataclass(frozen=True)
class LowRank:
    """A matrix kept as its thin SVD, ``M = U @ diag(S) @ Vt``, with ``S`` descending.

    Attributes
    ----------
    U : ndarray
        Left singular vectors, shape (d, R').
    S : ndarray
        Singular values, shape (R',), non-negative and descending.
    Vt : ndarray
        Right singular vectors (as rows), shape (R', l).
    """

    U: np.ndarray
    S: np.ndarray
    Vt: np.ndarray

    def dense(self) -> np.ndarray:
        """Return the d x l matrix (for tests and small modules only)."""
        return (self.U * self.S) @ self.Vt


def svd(matrix: np.ndarray, compute_uv: bool = True):
    """Thin SVD, as ``np.linalg.svd(matrix, full_matrices=False)``, that survives LAPACK's gesdd giving up.

    numpy calls gesdd (divide and conquer), which on rare finite matrices stops with "SVD did not converge";
    one did, on a round's Laplacian step (the default config at 1,536 rows a client, seed 42). gesvd (QR
    iteration) is slower but converges on them, so it is the fallback; a non-finite matrix is an error.
    """
    try:
        return np.linalg.svd(matrix, full_matrices=False, compute_uv=compute_uv)
    except np.linalg.LinAlgError:
        if not np.isfinite(matrix).all():
            raise ValueError("cannot take the SVD of a matrix with NaN or infinite entries") from None
        logging.getLogger(__name__).warning("gesdd did not converge on a %s matrix: gesvd used", matrix.shape)
        return scipy.linalg.svd(matrix, full_matrices=False, compute_uv=compute_uv, lapack_driver="gesvd")


def _check_weights(weights: Sequence[float], n: int) -> np.ndarray:
    """Return ``weights`` as float64 after checking there is one per item, finite, >= 0, not all zero."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or len(w) != n or n == 0:
        raise ValueError(f"need one weight per client: got {n} clients and {w.size} weights")
    if np.any(w < 0) or not np.isfinite(w).all() or w.sum() <= 0:
        raise ValueError(f"weights must be finite, non-negative and not all zero: got {w.tolist()}")
    return w


def _check_factors(factors: Sequence[Factor]) -> tuple[int, int, list[int]]:
    """Return ``(d, l, ranks)`` after checking every ``(B, A, s)`` has matching shapes and a finite scaling."""
    if not factors:
        raise ValueError("need at least one (B, A, s) factor triple: got none")
    ranks: list[int] = []
    for k, (b, a, s) in enumerate(factors):
        b_shape, a_shape = np.shape(b), np.shape(a)
        if len(b_shape) != 2 or len(a_shape) != 2 or b_shape[1] != a_shape[0] or b_shape[1] == 0:
            raise ValueError(f"client {k}: B {b_shape} and A {a_shape} must be (d, r) and (r, l) with r >= 1")
        if k == 0:
            d, l = b_shape[0], a_shape[1]
        if (b_shape[0], a_shape[1]) != (d, l):
            raise ValueError(f"client {k}: dW shape {(b_shape[0], a_shape[1])} differs from client 0's {(d, l)}")
        if not np.isfinite(s):
            raise ValueError(f"client {k}: scaling must be finite: got {s}")
        if not (np.isfinite(b).all() and np.isfinite(a).all()):
            raise ValueError(f"client {k}: B and A must be finite: got NaN or infinite entries")
        ranks.append(int(b_shape[1]))
    return int(d), int(l), ranks


def _check_targets(target_ranks: Sequence[int], target_scalings: Sequence[float], d: int, l: int) -> None:
    """Check there is one positive scaling per target rank and every rank is in [1, min(d, l)]."""
    if len(target_ranks) != len(target_scalings):
        raise ValueError(f"need one scaling per target rank: got {len(target_ranks)} ranks, {len(target_scalings)}")
    for r, s in zip(target_ranks, target_scalings, strict=True):
        if int(r) != r or not 1 <= r <= min(d, l):
            raise ValueError(f"target rank must be an integer in [1, {min(d, l)}] for a {d}x{l} update: got {r}")
        if not np.isfinite(s) or s <= 0:
            raise ValueError(f"target scaling must be finite and > 0: got {s}")


def lowrank_sum(factors: Sequence[Factor], weights: Sequence[float]) -> LowRank:
    """Thin SVD of ``M = sum_k p_k s_k B_k @ A_k`` without forming the dense d x l matrix.

    Stacks ``B~ = [sqrt(p_k) s_k B_k]`` (d x R) and ``A~ = [sqrt(p_k) A_k]`` (R x l), so that
    ``B~ @ A~ = M``; then thin QR of ``B~`` and ``A~.T`` and SVD of the small R x R core. Cost O((d + l) R^2),
    R = sum_k r_k over the terms with a non-zero weight.

    Parameters
    ----------
    factors : sequence of (B, A, s)
        Per client: B of shape (d, r_k), A of shape (r_k, l), scaling s_k.
    weights : sequence of float
        p_k >= 0, not all zero. Used as given (not renormalised), so that callers can mix terms with arbitrary
        non-negative coefficients (e.g. the Laplacian step); zero-weight terms are skipped.

    Returns
    -------
    LowRank
        ``U`` (d x R'), ``S`` (R', descending), ``Vt`` (R' x l) with R' = min(d, l, R) and ``M = U diag(S) Vt``.
    """
    _check_factors(factors)
    p = _check_weights(weights, len(factors))
    kept = [(np.sqrt(pk), f) for pk, f in zip(p, factors, strict=True) if pk > 0]
    b_stack = np.hstack([rk * s * np.asarray(b, dtype=np.float64) for rk, (b, _, s) in kept])
    a_stack = np.vstack([rk * np.asarray(a, dtype=np.float64) for rk, (_, a, _) in kept])
    q_b, r_b = np.linalg.qr(b_stack)
    q_a, r_a = np.linalg.qr(a_stack.T)
    u_core, s, vt_core = svd(r_b @ r_a.T)
    return LowRank(q_b @ u_core, s, vt_core @ q_a.T)


#: How a re-factored update is split into PEFT factors (run config ``factor-split``).
FACTOR_SPLITS = ("balanced", "a-orthonormal")

#: Row norm of an A that PEFT initialises (kaiming_uniform with a = sqrt(5): entries U(-1/sqrt(l), 1/sqrt(l)),
#: so each row has norm sqrt(1/3) whatever l). ``a-orthonormal`` gives A this row norm.
LORA_A_INIT_ROW_NORM = float(np.sqrt(1.0 / 3.0))


def to_factors(lowrank: LowRank, rank: int, scaling: float, split: str = "balanced") -> tuple[np.ndarray, np.ndarray]:
    """Best rank-``rank`` approximation of ``lowrank`` as PEFT factors ``(B, A)`` with ``scaling * B @ A``.

    ``balanced`` splits ``sqrt(S / scaling)`` evenly between B and A. ``a-orthonormal`` makes A the top right
    singular vectors at PEFT's initial row norm and puts the singular values in B: the shape LoRA starts
    from (A a well-scaled basis, B carrying the update). Early in training the singular values are small, and
    a balanced split then shrinks A too; since a step on B moves ``dW`` by ``dB @ A``, the next local round
    learns far more slowly. Both splits give the same product.

    Parameters
    ----------
    lowrank : LowRank
        The matrix to approximate (``U`` d x R', ``S``, ``Vt`` R' x l).
    rank : int
        Target rank, in [1, min(d, l)]. Beyond R' the factors are padded with zero columns of B / rows of A, so the
        shapes are always (d, rank) and (rank, l).
    scaling : float
        The target's LoRA scaling (alpha / rank, or alpha / sqrt(rank) with rsLoRA), > 0.
    split : str
        ``balanced`` or ``a-orthonormal`` (see above).

    Returns
    -------
    tuple of ndarray
        ``B`` of shape (d, rank) and ``A`` of shape (rank, l), float64.
    """
    d, l = lowrank.U.shape[0], lowrank.Vt.shape[1]
    _check_targets([rank], [scaling], d, l)
    if split not in FACTOR_SPLITS:
        raise ValueError(f"unknown factor split {split!r}: expected one of {', '.join(FACTOR_SPLITS)}")
    k = min(rank, len(lowrank.S))
    if split == "balanced":
        b_scale = a_scale = np.sqrt(lowrank.S[:k] / scaling)
    else:
        a_scale = np.full(k, LORA_A_INIT_ROW_NORM)
        b_scale = lowrank.S[:k] / (scaling * LORA_A_INIT_ROW_NORM)
    b = np.zeros((d, rank))
    a = np.zeros((rank, l))
    b[:, :k] = lowrank.U[:, :k] * b_scale
    a[:k] = a_scale[:, None] * lowrank.Vt[:k]
    return b, a


def aggregate_exact(
    factors: Sequence[Factor],
    weights: Sequence[float],
    target_ranks: Sequence[int],
    target_scalings: Sequence[float],
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each target's best rank-r approximation of the weighted mean update ``sum_k p_k s_k B_k A_k``.

    Parameters
    ----------
    factors : sequence of (B, A, s)
        Per client: B (d, r_k), A (r_k, l), scaling s_k.
    weights : sequence of float
        Non-negative (e.g. ``num-examples``), not all zero; normalised to sum to 1.
    target_ranks : sequence of int
        One rank per output (the client the factors go to).
    target_scalings : sequence of float
        One scaling per output, consistent with its rank (alpha / r or alpha / sqrt(r)).

    Returns
    -------
    list of (B, A)
        Per target, ``s_t * B @ A`` is the truncated SVD of the mean update at rank ``r_t``.
    """
    d, l, _ = _check_factors(factors)
    _check_targets(target_ranks, target_scalings, d, l)
    w = _check_weights(weights, len(factors))
    mean = lowrank_sum(factors, w / w.sum())
    return [to_factors(mean, r, s) for r, s in zip(target_ranks, target_scalings, strict=True)]


def _padded_factor_mean(factors: Sequence[Factor], weights: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Weighted mean of ``s_k B_k`` and of ``A_k``, each zero-padded to ``rank``; the scaling lives in B."""
    d, l, _ = _check_factors(factors)
    p = weights / weights.sum()
    b_mean, a_mean = np.zeros((d, rank)), np.zeros((rank, l))
    for pk, (b, a, s) in zip(p, factors, strict=True):
        r = np.shape(b)[1]
        b_mean[:, :r] += pk * s * np.asarray(b, dtype=np.float64)
        a_mean[:r] += pk * np.asarray(a, dtype=np.float64)
    return b_mean, a_mean


def _truncate_factors(
    b_mean: np.ndarray, a_mean: np.ndarray, target_ranks: Sequence[int], target_scalings: Sequence[float]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """First r_t columns of B (unscaled by s_t) and rows of A per target, zero-padded where r_t exceeds them."""
    out = []
    for r, s in zip(target_ranks, target_scalings, strict=True):
        k = min(r, a_mean.shape[0])
        b, a = np.zeros((b_mean.shape[0], r)), np.zeros((r, a_mean.shape[1]))
        b[:, :k], a[:k] = b_mean[:, :k] / s, a_mean[:k]
        out.append((b, a))
    return out


def aggregate_zero_pad(
    factors: Sequence[Factor],
    weights: Sequence[float],
    target_ranks: Sequence[int],
    target_scalings: Sequence[float],
) -> list[tuple[np.ndarray, np.ndarray]]:
    """HetLoRA-style baseline: zero-pad factors to the largest rank, average B and A separately, truncate.

    Each client's scaling is folded into its B first, so padded factors of different ranks are comparable;
    each target then gets the first r_t columns of B (divided by its own scaling) and rows of A.

    Parameters
    ----------
    factors : sequence of (B, A, s)
        Per client: B (d, r_k), A (r_k, l), scaling s_k.
    weights : sequence of float
        Non-negative, not all zero; normalised to sum to 1.
    target_ranks : sequence of int
        One rank per output.
    target_scalings : sequence of float
        One scaling per output.

    Returns
    -------
    list of (B, A)
        Per target, B (d, r_t) and A (r_t, l).
    """
    d, l, ranks = _check_factors(factors)
    _check_targets(target_ranks, target_scalings, d, l)
    b_mean, a_mean = _padded_factor_mean(factors, _check_weights(weights, len(factors)), max(ranks))
    return _truncate_factors(b_mean, a_mean, target_ranks, target_scalings)


def aggregate_svd_dense(
    factors: Sequence[Factor],
    weights: Sequence[float],
    target_ranks: Sequence[int],
    target_scalings: Sequence[float],
) -> list[tuple[np.ndarray, np.ndarray]]:
    """FlexLoRA-style baseline: dense weighted mean of ``s_k B_k A_k``, dense SVD, truncate per target.

    Mathematically the same result as :func:`aggregate_exact`, at O(d l min(d, l)) cost instead of
    O((d + l) R^2).

    Parameters
    ----------
    factors : sequence of (B, A, s)
        Per client: B (d, r_k), A (r_k, l), scaling s_k.
    weights : sequence of float
        Non-negative, not all zero; normalised to sum to 1.
    target_ranks : sequence of int
        One rank per output.
    target_scalings : sequence of float
        One scaling per output.

    Returns
    -------
    list of (B, A)
        Per target, ``s_t * B @ A`` is the truncated SVD of the mean update at rank ``r_t``.
    """
    d, l, _ = _check_factors(factors)
    _check_targets(target_ranks, target_scalings, d, l)
    w = _check_weights(weights, len(factors))
    w = w / w.sum()
    dense = sum(
        wk * s * np.asarray(b, dtype=np.float64) @ np.asarray(a, dtype=np.float64)
        for wk, (b, a, s) in zip(w, factors, strict=True)
    )
    mean = LowRank(*svd(dense))
    return [to_factors(mean, r, s) for r, s in zip(target_ranks, target_scalings, strict=True)]


def aggregate_factor_avg(
    factors: Sequence[Factor],
    weights: Sequence[float],
    target_ranks: Sequence[int],
    target_scalings: Sequence[float],
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Naive baseline: average B (with scalings folded in) and A separately; the product of the averages.

    Only defined when every client and every target has the same rank. Note that mean(B) @ mean(A) is in
    general not mean(B @ A): this is the error the other methods avoid.

    Parameters
    ----------
    factors : sequence of (B, A, s)
        Per client: B (d, r), A (r, l), scaling s_k.
    weights : sequence of float
        Non-negative, not all zero; normalised to sum to 1.
    target_ranks : sequence of int
        One rank per output; all equal to the clients' common rank.
    target_scalings : sequence of float
        One scaling per output.

    Returns
    -------
    list of (B, A)
        Per target, ``mean_k(s_k B_k) / s_t`` and ``mean_k(A_k)``.
    """
    d, l, ranks = _check_factors(factors)
    if len(set(ranks) | set(target_ranks)) != 1:
        raise ValueError(f"factor-avg needs equal ranks: got input ranks {ranks}, target ranks {list(target_ranks)}")
    _check_targets(target_ranks, target_scalings, d, l)
    b_mean, a_mean = _padded_factor_mean(factors, _check_weights(weights, len(factors)), ranks[0])
    return _truncate_factors(b_mean, a_mean, target_ranks, target_scalings)


_AGGREGATORS = {
    "exact": aggregate_exact,
    "zero-pad": aggregate_zero_pad,
    "svd-dense": aggregate_svd_dense,
    "factor-avg": aggregate_factor_avg,
}


def lora_scaling(alpha: float, rank: int, use_rslora: bool = False) -> float:
    """PEFT's LoRA scaling for ``rank``: ``alpha / rank``, or ``alpha / sqrt(rank)`` with rsLoRA.

    Parameters
    ----------
    alpha : float
        ``lora_alpha``.
    rank : int
        The module's LoRA rank r >= 1.
    use_rslora : bool
        Whether the adapter uses rank-stabilised scaling.

    Returns
    -------
    float
        The factor s in ``dW = s * B @ A``.
    """
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1: got {rank}")
    if not np.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"lora alpha must be finite and > 0: got {alpha}")
    return float(alpha / np.sqrt(rank) if use_rslora else alpha / rank)


def lora_modules(states: Sequence[State]) -> list[str]:
    """Names of the LoRA-adapted modules shared by ``states``, after checking their keys pair up.

    A module is a key with its ``.lora_A.weight`` / ``.lora_B.weight`` suffix stripped.

    Parameters
    ----------
    states : sequence of dict[str, ndarray]
        PEFT adapter state dicts holding only LoRA factors (task heads are aggregated elsewhere).

    Returns
    -------
    list of str
        Sorted module names.
    """
    if not states:
        raise ValueError("need at least one state: got none")
    keys = set(states[0])
    for i, state in enumerate(states):
        if set(state) != keys:
            raise ValueError(f"state {i} has keys {sorted(set(state) ^ keys)[:3]} that state 0 does not share")
    modules = set()
    for key in sorted(keys):
        if not key.endswith((LORA_A_SUFFIX, LORA_B_SUFFIX)):
            raise ValueError(
                f"key {key!r} is not a LoRA factor: expected a name ending in {LORA_A_SUFFIX!r} or {LORA_B_SUFFIX!r}"
            )
        module = key[: -len(LORA_A_SUFFIX)]
        partner = module + (LORA_B_SUFFIX if key.endswith(LORA_A_SUFFIX) else LORA_A_SUFFIX)
        if partner not in keys:
            raise ValueError(f"key {key!r} has no partner {partner!r}")
        modules.add(module)
    if not modules:
        raise ValueError("states hold no LoRA factors: got no keys")
    return sorted(modules)


def module_factors(states: Sequence[State], module: str, alpha: float, use_rslora: bool = False) -> list[Factor]:
    """Each state's ``(B, A, s)`` for ``module``, with its rank read from A and s = PEFT's scaling for it.

    Parameters
    ----------
    states : sequence of dict[str, ndarray]
        PEFT adapter state dicts (checked by :func:`lora_modules`).
    module : str
        Module name (a key without its ``.lora_A.weight`` / ``.lora_B.weight`` suffix).
    alpha : float
        ``lora_alpha``, shared by all clients.
    use_rslora : bool
        Whether scaling is ``alpha / sqrt(r)`` instead of ``alpha / r``.

    Returns
    -------
    list of (B, A, s)
        One triple per state, in float64.
    """
    a_key, b_key = module + LORA_A_SUFFIX, module + LORA_B_SUFFIX
    out: list[Factor] = []
    for i, state in enumerate(states):
        a, b = np.asarray(state[a_key], dtype=np.float64), np.asarray(state[b_key], dtype=np.float64)
        if a.ndim != 2 or b.ndim != 2 or b.shape[1] != a.shape[0]:
            raise ValueError(f"state {i}: {b_key!r} {b.shape} and {a_key!r} {a.shape} must be (out, r) and (r, in)")
        if out and (b.shape[0], a.shape[1]) != (out[0][0].shape[0], out[0][1].shape[1]):
            shape0 = (out[0][0].shape[0], out[0][1].shape[1])
            raise ValueError(f"state {i}: {a_key!r} has (out, in) {(b.shape[0], a.shape[1])}, state 0 has {shape0}")
        out.append((b, a, lora_scaling(alpha, a.shape[0], use_rslora)))
    return out


def _check_target_modules(states: Sequence[State], targets: Sequence[Mapping[str, int]], modules: list[str]) -> None:
    """Check target dicts name only known modules and that a missing module has a same-index state to copy."""
    for t, ranks in enumerate(targets):
        unknown = set(ranks) - set(modules)
        if unknown:
            raise ValueError(f"target {t} names unknown module {min(unknown)!r}")
        if t >= len(states) and len(ranks) < len(modules):
            missing = min(set(modules) - set(ranks))
            raise ValueError(f"target {t} has no rank for {missing!r} and no state {t} to take it from")


def aggregate_states(
    states: Sequence[State],
    weights: Sequence[float],
    target_ranks_per_module: Sequence[Mapping[str, int]],
    alpha: float,
    method: str,
    use_rslora: bool = False,
) -> list[dict[str, np.ndarray]]:
    """Aggregate PEFT adapter state dicts of possibly different ranks, module by module.

    Parameters
    ----------
    states : sequence of dict[str, ndarray]
        One PEFT adapter state dict per client, holding only ``*.lora_A.weight`` (r, in) and
        ``*.lora_B.weight`` (out, r) keys; the same keys for every client, ranks may differ.
    weights : sequence of float
        Non-negative (e.g. ``num-examples``), not all zero.
    target_ranks_per_module : sequence of dict[str, int]
        One dict per output state: module name (a key without its ``.lora_A.weight`` suffix, as listed by
        :func:`lora_modules`) -> rank. A module missing from dict t gets the rank it has in
        ``states[t]`` (so ``[{}] * len(states)`` keeps every client's own ranks); that needs t < len(states).
    alpha : float
        ``lora_alpha``, shared by all clients; each factor's scaling is alpha / r (or alpha / sqrt(r)).
    method : str
        One of ``"exact"``, ``"zero-pad"``, ``"svd-dense"``, ``"factor-avg"``.
    use_rslora : bool
        Whether the adapters use rsLoRA scaling.

    Returns
    -------
    list of dict[str, ndarray]
        One state per target, same keys as the inputs, factors of shape (out, r_t) / (r_t, in), float32.
    """
    if method not in _AGGREGATORS:
        raise ValueError(f"unknown aggregation method {method!r}: expected one of {AGGREGATION_METHODS}")
    modules = lora_modules(states)
    _check_target_modules(states, target_ranks_per_module, modules)
    outputs: list[dict[str, np.ndarray]] = [{} for _ in target_ranks_per_module]
    for module in modules:
        factors = module_factors(states, module, alpha, use_rslora)
        ranks = [t[module] if module in t else factors[i][1].shape[0] for i, t in enumerate(target_ranks_per_module)]
        try:
            scalings = [lora_scaling(alpha, r, use_rslora) for r in ranks]
            merged = _AGGREGATORS[method](factors, weights, ranks, scalings)
        except ValueError as err:  # the math does not know module names: add it so the bad tensor can be found
            raise ValueError(f"module {module!r}: {err}") from err
        for out, (b, a) in zip(outputs, merged, strict=True):
            out[module + LORA_A_SUFFIX] = a.astype(np.float32)
            out[module + LORA_B_SUFFIX] = b.astype(np.float32)
    return outputs


def refactor_state(state: State, alpha: float, split: str, use_rslora: bool = False) -> dict[str, np.ndarray]:
    """Every module's factors re-split by :func:`to_factors` at the same rank: ``s B A`` is unchanged.

    Parameters
    ----------
    state : dict[str, ndarray]
        A PEFT adapter state (LoRA factors only).
    alpha : float
        ``lora_alpha``.
    split : str
        One of :data:`FACTOR_SPLITS`.
    use_rslora : bool
        Whether the adapter uses rsLoRA scaling.

    Returns
    -------
    dict[str, ndarray]
        The same keys and shapes, in the input dtype.
    """
    out: dict[str, np.ndarray] = {}
    for module in lora_modules([state]):
        ((b, a, s),) = module_factors([state], module, alpha, use_rslora)
        new_b, new_a = to_factors(lowrank_sum([(b, a, s)], [1.0]), a.shape[0], s, split)
        out[module + LORA_A_SUFFIX] = new_a.astype(state[module + LORA_A_SUFFIX].dtype)
        out[module + LORA_B_SUFFIX] = new_b.astype(state[module + LORA_B_SUFFIX].dtype)
    return out


#: Where a server step moves an adapter: its factors (methods that average factors) or dW (methods that
#: aggregate products).
STEP_SPACES = ("factors", "dw")


def server_step(
    old: State, new: State, lr: float, alpha: float, space: str, use_rslora: bool = False
) -> dict[str, np.ndarray]:
    """FedOpt's server SGD step on one client's update: ``old + lr * (new - old)``.

    Averaged over a group this is ``mean_old + lr * mean(new - old)``: ``lr = 1`` is plain averaging, and
    ``lr > 1`` undoes the shrinkage that averaging clients' steps causes (n IID clients that each took
    t steps move the average about as far as one client's t steps, not n t).

    Parameters
    ----------
    old, new : dict[str, ndarray]
        A client's adapter before and after its local round: the same keys and shapes.
    lr : float
        Server learning rate, > 0.
    alpha : float
        ``lora_alpha``.
    space : str
        ``factors``: the step on each tensor (an element-wise extrapolation). ``dw``: on each module's
        ``dW = s B A``, exactly: the result holds ``[new | old]`` stacked to rank ``r_new + r_old`` with
        coefficients ``lr`` and ``1 - lr``, for a dW-space aggregation to truncate to the target ranks.
    use_rslora : bool
        Whether the adapters use rsLoRA scaling.

    Returns
    -------
    dict[str, ndarray]
        The stepped state (twice the rank of ``new`` per module for ``dw`` unless ``lr = 1``).
    """
    if not np.isfinite(lr) or lr <= 0:
        raise ValueError(f"server lr must be finite and > 0: got {lr}")
    if space not in STEP_SPACES:
        raise ValueError(f"unknown step space {space!r}: expected one of {', '.join(STEP_SPACES)}")
    if set(old) != set(new):
        raise ValueError(f"old and new states differ in keys {sorted(set(old) ^ set(new))[:3]}")
    if lr == 1.0:
        return dict(new)
    if space == "factors":
        return {k: (old[k] + lr * (np.asarray(new[k], np.float64) - old[k])).astype(new[k].dtype) for k in new}
    out: dict[str, np.ndarray] = {}
    for module in lora_modules([new]):
        (b_new, a_new, s_new), (b_old, a_old, s_old) = (
            module_factors([x], module, alpha, use_rslora)[0] for x in (new, old)
        )
        rank = a_new.shape[0] + a_old.shape[0]
        s_cat = lora_scaling(alpha, rank, use_rslora)
        b_cat = np.hstack([b_new * (lr * s_new / s_cat), b_old * ((1.0 - lr) * s_old / s_cat)])
        out[module + LORA_A_SUFFIX] = np.vstack([a_new, a_old]).astype(new[module + LORA_A_SUFFIX].dtype)
        out[module + LORA_B_SUFFIX] = b_cat.astype(new[module + LORA_B_SUFFIX].dtype)
    return out


def singular_values(b: np.ndarray, a: np.ndarray, scaling: float) -> np.ndarray:
    """Singular values of ``scaling * B @ A`` without forming it: QR of both factors, SVD of an r x r core."""
    rb = np.linalg.qr(np.asarray(b, dtype=np.float64), mode="r")
    ra = np.linalg.qr(np.asarray(a, dtype=np.float64).T, mode="r")
    return svd(scaling * rb @ ra.T, compute_uv=False)


def energy_by_slice(state: State, alpha: float, edges: Sequence[int]) -> list[float]:
    """Share of an adapter's energy (sum of squared singular values of every module's dW) per rank slice.

    ``edges`` = (2, 4, 8, 16) gives the slices 1-2, 3-4, 5-8 and 9-16 of each module's spectrum, in
    decreasing order of singular value; a module of rank 4 has no energy past the second slice. The
    shares sum to 1 (all 0 for an all-zero adapter). Watching them over rounds shows whether aggregation
    pushes the update's energy into the leading components that every rank shares ("rank collapse").
    """
    bounds = [0, *sorted(edges)]
    energy = np.zeros(len(bounds) - 1)
    for key, a in state.items():
        if not key.endswith(LORA_A_SUFFIX):
            continue
        b = state[key[: -len(LORA_A_SUFFIX)] + LORA_B_SUFFIX]
        sq = singular_values(b, a, lora_scaling(alpha, a.shape[0])) ** 2
        for i in range(len(energy)):
            energy[i] += sq[bounds[i] : bounds[i + 1]].sum()
    total = energy.sum()
    return [float(x) for x in (energy / total if total > 0 else energy)]
