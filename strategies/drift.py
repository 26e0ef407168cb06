"""Client drift inside a group, measured on the round's LoRA updates in dW space (no Flower imports).

Averaging a group's updates moves its model as far as one client's update only when the updates agree;
where they point apart (client drift), the mean is shorter than each of them. Two numbers per group and
round say which:

- ``cosine``: the mean pairwise cosine of the members' updates ``u_i = dW_i(returned) - dW_i(sent)``;
- ``kept``: ``||sum_i w_i u_i|| / sum_i w_i ||u_i||``, the share of a member's step length that the
  weighted mean keeps (1 when the updates are equal, ``1 / sqrt(n)`` for ``n`` orthogonal ones of equal
  length).

Both come from the updates' Gram matrix, computed from the factors in O((d + l) r^2) per module: a
client's update to a module is ``[s B, -s0 B0] @ [A; A0]``, and ``<P Q, R S>_F = sum((P^T R) * (Q S^T))``.
Modules differ in rank between clients (heterogeneous ranks); dW space makes the updates comparable.

``server-lr-rule = keep-length`` sizes a group's server step from ``kept``: the group's mean update is scaled
by ``1 / kept`` (at most ``sqrt(n)``, the value for ``n`` orthogonal updates of equal length), so it is as long
as its members' updates are on average. Where the updates agree that is plain averaging; where they are
mostly each client's own noise (CoLA's cosine is about 0.05) averaging shortens the step by about
``1 / sqrt(n)``, and the rule gives that length back along the mean's direction.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from atlas_flwr.common.state import LORA_A_SUFFIX, LORA_B_SUFFIX, State, module_ranks
from strategies.aggregation import lora_scaling

#: How a group's server step is sized: ``server-lr`` alone, or times :func:`keep_length_factor`.
SERVER_LR_RULES = ("fixed", "keep-length")


def _update_factors(sent: State, returned: State, module: str, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """``(P, Q)`` with ``P @ Q = s B A - s0 B0 A0`` for ``module`` (a module absent from ``sent`` counts as 0)."""
    b = np.asarray(returned[module + LORA_B_SUFFIX], dtype=np.float64)
    a = np.asarray(returned[module + LORA_A_SUFFIX], dtype=np.float64)
    p, q = [lora_scaling(alpha, a.shape[0]) * b], [a]
    if module + LORA_A_SUFFIX in sent:
        b0 = np.asarray(sent[module + LORA_B_SUFFIX], dtype=np.float64)
        a0 = np.asarray(sent[module + LORA_A_SUFFIX], dtype=np.float64)
        p.append(-lora_scaling(alpha, a0.shape[0]) * b0)
        q.append(a0)
    return np.concatenate(p, axis=1), np.concatenate(q, axis=0)


def update_gram(sent: Sequence[State], returned: Sequence[State], alpha: float) -> np.ndarray:
    """The Gram matrix ``G[i, j] = <u_i, u_j>_F`` of the members' dW updates, summed over shared modules.

    Parameters
    ----------
    sent : sequence of dict[str, ndarray]
        Each member's adapter as the server sent it this round.
    returned : sequence of dict[str, ndarray]
        Each member's trained adapter, as it came back (the modules it trained).
    alpha : float
        ``lora_alpha``: dW = (alpha / r) B A at each side's own rank.

    Returns
    -------
    ndarray, shape (n, n)
        Symmetric and positive semi-definite; over the modules every member returned (no module: zeros).
    """
    if len(sent) != len(returned):
        raise ValueError(f"need one sent state per returned state: got {len(sent)} and {len(returned)}")
    n = len(returned)
    gram = np.zeros((n, n))
    if n == 0:
        return gram
    modules = set.intersection(*(set(module_ranks(r)) for r in returned))
    for module in sorted(modules):
        factors = [_update_factors(s, r, module, alpha) for s, r in zip(sent, returned, strict=True)]
        for i, (p_i, q_i) in enumerate(factors):
            for j in range(i, n):
                p_j, q_j = factors[j]
                value = float(np.sum((p_i.T @ p_j) * (q_i @ q_j.T)))
                gram[i, j] += value
                if j != i:
                    gram[j, i] += value
    return gram


def cosines(gram: np.ndarray) -> np.ndarray:
    """The pairwise cosines of a Gram matrix's vectors; NaN in the rows and columns of a zero vector."""
    norms = np.sqrt(np.clip(np.diag(gram), 0.0, None))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(np.outer(norms, norms) > 0, gram / np.outer(norms, norms), np.nan)


def drift(gram: np.ndarray, weights: Sequence[float]) -> Mapping[str, float]:
    """``cosine`` (mean pairwise) and ``kept`` (mean update length over mean length) from a Gram matrix.

    Parameters
    ----------
    gram : ndarray, shape (n, n)
        From :func:`update_gram`; n >= 2.
    weights : sequence of float
        The aggregation weights (rows trained), not all zero.

    Returns
    -------
    dict
        ``{"cosine": ..., "kept": ...}``; NaN where an update is zero (nothing to compare).
    """
    n = gram.shape[0]
    w = np.asarray(weights, dtype=np.float64)
    if n < 2 or gram.shape != (n, n) or w.shape != (n,):
        raise ValueError(f"need an n x n Gram matrix and n weights with n >= 2: got {gram.shape} and {w.shape}")
    if np.any(w < 0) or w.sum() <= 0:
        raise ValueError(f"weights must be non-negative and not all zero: got {w.tolist()}")
    w = w / w.sum()
    norms = np.sqrt(np.clip(np.diag(gram), 0.0, None))
    if np.any(norms == 0):
        return {"cosine": float("nan"), "kept": float("nan")}
    pairs = cosines(gram)[np.triu_indices(n, k=1)]
    mean_length = float(np.sqrt(max(w @ gram @ w, 0.0)))
    return {"cosine": float(pairs.mean()), "kept": mean_length / float(w @ norms)}


def vector_gram(sent: Sequence[State], returned: Sequence[State]) -> np.ndarray:
    """The Gram matrix of plain tensor updates ``returned - sent`` (heads), over every key, flattened."""
    if len(sent) != len(returned):
        raise ValueError(f"need one sent state per returned state: got {len(sent)} and {len(returned)}")
    rows = [
        np.concatenate([(np.asarray(r[k], np.float64) - np.asarray(s[k], np.float64)).ravel() for k in sorted(r)])
        for s, r in zip(sent, returned, strict=True)
    ]
    stacked = np.stack(rows) if rows else np.zeros((0, 0))
    return stacked @ stacked.T


def keep_length_factor(gram: np.ndarray, weights: Sequence[float]) -> float:
    """``min(1 / kept, sqrt(n))``: what scales a group's mean update to its members' mean length (1 if undefined).

    Parameters
    ----------
    gram : ndarray, shape (n, n)
        The members' update Gram matrix (:func:`update_gram`, :func:`vector_gram`).
    weights : sequence of float
        The aggregation weights.

    Returns
    -------
    float
        In ``[1, sqrt(n)]``; 1 for fewer than two members or a member that did not move.
    """
    n = gram.shape[0]
    if n < 2:
        return 1.0
    kept = drift(gram, weights)["kept"]
    if not np.isfinite(kept) or kept <= 0:
        return float(np.sqrt(n)) if kept == 0 else 1.0
    return float(min(1.0 / kept, np.sqrt(n)))
