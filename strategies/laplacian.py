"""Laplacian personalization of LoRA updates over a client-similarity graph (numpy only, no Flower imports).

MIRA-style: each client's update moves toward its neighbours' in dW space,
``dW_k <- (1 - eta lam delta_k) dW_k + eta lam sum_{l != k} a_kl dW_l`` with ``delta_k = sum_l a_kl``,
which is one gradient step of size eta on ``(lam / 2) sum_{k<l} a_kl ||dW_k - dW_l||^2`` (for a symmetric graph).
The mix is formed in low-rank form and re-projected to each client's own rank and scaling.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from strategies.aggregation import (
    LORA_A_SUFFIX,
    LORA_B_SUFFIX,
    Factor,
    State,
    lora_modules,
    lora_scaling,
    lowrank_sum,
    module_factors,
    to_factors,
)


def similarity_graph(fingerprints: np.ndarray, sigma2: float | None = None) -> np.ndarray:
    """Gaussian-kernel similarity between client fingerprints, ``a_kl = exp(-||f_k - f_l||^2 / sigma2)``.

    Parameters
    ----------
    fingerprints : ndarray
        Shape (n, m): one fingerprint (e.g. a mean sentence embedding) per client.
    sigma2 : float, optional
        Kernel bandwidth, > 0. Defaults to the median of the off-diagonal squared distances, so that a typical
        pair gets weight about exp(-1) whatever the fingerprints' scale; 1.0 when that median is 0 (all
        fingerprints equal, or fewer than two clients).

    Returns
    -------
    ndarray
        Shape (n, n), symmetric, zero diagonal, off-diagonal entries in (0, 1].
    """
    f = np.asarray(fingerprints, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] == 0 or not np.isfinite(f).all():
        raise ValueError(f"fingerprints must be a finite (n, m) array with n >= 1: got shape {f.shape}")
    diff = f[:, None, :] - f[None, :, :]  # differences, not the Gram trick: no cancellation for close clients
    sq = np.einsum("klm,klm->kl", diff, diff)
    pairs = sq[np.triu_indices(len(f), k=1)]
    if sigma2 is None:
        median = float(np.median(pairs)) if pairs.size else 0.0
        sigma2 = median if median > 0 else 1.0
    if not np.isfinite(sigma2) or sigma2 <= 0:
        raise ValueError(f"sigma2 must be finite and > 0: got {sigma2}")
    a = np.exp(-sq / sigma2)
    np.fill_diagonal(a, 0.0)
    return a


def _check_adjacency(adjacency: np.ndarray, n: int) -> np.ndarray:
    """Return the adjacency as float64 with its diagonal zeroed, after checking shape and sign."""
    a = np.array(adjacency, dtype=np.float64)
    if a.shape != (n, n) or not np.isfinite(a).all() or np.any(a < 0):
        raise ValueError(f"adjacency must be a finite, non-negative ({n}, {n}) array: got shape {a.shape}")
    # Self-loops cancel in the Laplacian (D - A), so dropping them changes nothing and keeps delta_k honest.
    np.fill_diagonal(a, 0.0)
    return a


def laplacian_step(
    factors_per_client: Sequence[Factor],
    adjacency: np.ndarray,
    eta: float,
    lam: float,
    target_ranks: Sequence[int],
    target_scalings: Sequence[float],
) -> list[tuple[np.ndarray, np.ndarray]]:
    """One Laplacian smoothing step on one module's updates, re-projected to each client's rank.

    Parameters
    ----------
    factors_per_client : sequence of (B, A, s)
        Per client, its factors for ONE module: B (d, r_k), A (r_k, l), scaling s_k (``dW_k = s_k B_k A_k``).
    adjacency : ndarray
        (n, n) non-negative similarities a_kl (e.g. from :func:`similarity_graph`); the diagonal is ignored.
    eta : float
        Step size, >= 0. ``eta = 0`` returns every client's own update (re-projected).
    lam : float
        Regularisation strength, >= 0.
    target_ranks : sequence of int
        Per client, the rank of its returned factors (usually its own r_k).
    target_scalings : sequence of float
        Per client, the scaling its returned factors will be used with (usually its own s_k).

    Returns
    -------
    list of (B, A)
        Per client, ``s_k B' A'`` is the best rank-r_k approximation of its smoothed update.

    Raises
    ------
    ValueError
        If ``eta * lam * max_k delta_k > 1``: a client's own weight would turn negative.
    """
    n = len(factors_per_client)
    if n == 0:
        raise ValueError("need at least one client's (B, A, s): got none")
    a = _check_adjacency(adjacency, n)
    if not (np.isfinite(eta) and np.isfinite(lam) and eta >= 0 and lam >= 0):
        raise ValueError(f"eta and lam must be finite and >= 0: got eta={eta}, lam={lam}")
    if len(target_ranks) != n or len(target_scalings) != n:
        raise ValueError(
            f"need one target rank and scaling per client: got {n} clients, {len(target_ranks)} ranks, "
            f"{len(target_scalings)} scalings"
        )
    degree = a.sum(axis=1)
    step = eta * lam
    if step * degree.max() > 1 + 1e-12:
        raise ValueError(
            f"eta * lam * max degree must be <= 1: got eta={eta}, lam={lam}, max degree {degree.max():.6g} "
            f"(product {step * degree.max():.6g})"
        )
    out = []
    for k in range(n):
        weights = step * a[k]
        weights[k] = max(1.0 - step * degree[k], 0.0)  # clip the rounding residue at the bound
        mixed = lowrank_sum(factors_per_client, weights)
        out.append(to_factors(mixed, target_ranks[k], target_scalings[k]))
    return out


def laplacian_states(
    states: Sequence[State],
    adjacency: np.ndarray,
    eta: float,
    lam: float,
    alpha: float,
    use_rslora: bool = False,
    target_ranks: Sequence[Mapping[str, int]] | None = None,
) -> list[dict[str, np.ndarray]]:
    """Apply :func:`laplacian_step` to every LoRA module of PEFT adapter states, re-projected to given ranks.

    Parameters
    ----------
    states : sequence of dict[str, ndarray]
        One PEFT adapter state dict per client (only ``*.lora_A.weight`` / ``*.lora_B.weight`` keys, the same
        keys for all clients; ranks may differ).
    adjacency : ndarray
        (n, n) client similarities, in the order of ``states``.
    eta : float
        Step size, >= 0.
    lam : float
        Regularisation strength, >= 0.
    alpha : float
        ``lora_alpha``; each factor's scaling is alpha / r (alpha / sqrt(r) with rsLoRA).
    use_rslora : bool
        Whether the adapters use rsLoRA scaling.
    target_ranks : sequence of dict[str, int], optional
        Per client, module -> the rank of its output; a module it does not name keeps its input rank
        (the default for every module). Mixing untruncated aggregates and truncating once, here, keeps
        the step from pulling a client toward its peers' truncations of the same update.

    Returns
    -------
    list of dict[str, ndarray]
        One state per client, same keys as its input, float32, at the target ranks.
    """
    if target_ranks is not None and len(target_ranks) != len(states):
        raise ValueError(f"need one target-rank map per state: got {len(target_ranks)} for {len(states)} states")
    outputs: list[dict[str, np.ndarray]] = [{} for _ in states]
    for module in lora_modules(states):
        factors = module_factors(states, module, alpha, use_rslora)
        ranks = [b.shape[1] for b, _, _ in factors]
        if target_ranks is not None:
            ranks = [int(t.get(module, r)) for t, r in zip(target_ranks, ranks, strict=True)]
        try:
            scalings = [lora_scaling(alpha, r, use_rslora) for r in ranks]
            mixed = laplacian_step(factors, adjacency, eta, lam, ranks, scalings)
        except ValueError as err:  # the math does not know module names: add it so the bad tensor can be found
            raise ValueError(f"module {module!r}: {err}") from err
        for out, (b, a) in zip(outputs, mixed, strict=True):
            out[module + LORA_A_SUFFIX] = a.astype(np.float32)
            out[module + LORA_B_SUFFIX] = b.astype(np.float32)
    return outputs
