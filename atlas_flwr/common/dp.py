"""Differential privacy on a client's updates: clip the whole update, add seeded Gaussian noise, account.

Each round a client releases ``received + clip(new - received, C) + N(0, (z C)^2)`` over every tensor it
sends (its trained adapter modules and its head). The clip bounds what the client's whole dataset can
change in a release (client-level sensitivity C), so each release is a Gaussian mechanism with noise
multiplier z, and a run of T rounds composes T of them (no sampling: every client trains every round).
Flower's FlatClip (``compute_clip_model_update``) clips; the noise comes from a generator seeded by
(seed, client, round), so a run is reproducible, which Flower's ``LocalDpMod`` (global numpy RNG, one
ArrayRecord per message) is not; the accounting is Flower's RDP accountant, as for the fingerprints.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def privatize_update(
    new: Mapping[str, np.ndarray], received: Mapping[str, np.ndarray], clip: float, noise: float, seed: int
) -> dict[str, np.ndarray]:
    """``received`` plus the clipped, noised update ``new - received`` (keys and shapes of ``new``)."""
    from flwr.supercore.differential_privacy import compute_clip_model_update

    if clip <= 0:
        raise ValueError(f"clip {clip!r} is invalid: expected a norm > 0")
    keys = sorted(new)
    missing = [k for k in keys if k not in received or received[k].shape != new[k].shape]
    if missing:
        raise ValueError(f"update tensor {missing[0]!r} has no received tensor of its shape")
    out = [np.asarray(new[k], dtype=np.float64).copy() for k in keys]
    old = [np.asarray(received[k], dtype=np.float64) for k in keys]
    if update_norm(new, received) > 0:  # Flower's FlatClip divides by the norm
        compute_clip_model_update(out, old, clip)
    rng = np.random.default_rng(seed)
    for array in out:
        array += rng.normal(0.0, noise * clip, size=array.shape) if noise > 0 else 0.0
    return {k: a.astype(np.asarray(new[k]).dtype) for k, a in zip(keys, out, strict=True)}


def privatize_states(
    new: tuple[Mapping[str, np.ndarray], Mapping[str, np.ndarray]],
    received: tuple[Mapping[str, np.ndarray], Mapping[str, np.ndarray]],
    clip: float,
    noise: float,
    seed: int,
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], float]:
    """:func:`privatize_update` over an (adapter, head) pair as one update; also its norm before the clip."""
    joined_new = {f"{i}/{k}": v for i, state in enumerate(new) for k, v in state.items()}
    joined_old = {f"{i}/{k}": v for i, state in enumerate(received) for k, v in state.items()}
    private = privatize_update(joined_new, joined_old, clip, noise, seed)
    parts = ({k[2:]: v for k, v in private.items() if k.startswith(f"{i}/")} for i in range(2))
    return *parts, update_norm(joined_new, joined_old)


def update_norm(new: Mapping[str, np.ndarray], received: Mapping[str, np.ndarray]) -> float:
    """The L2 norm of ``new - received`` over every tensor (what the clip bounds)."""
    return float(np.sqrt(sum(np.sum((np.asarray(new[k], np.float64) - received[k]) ** 2) for k in new)))


def run_epsilon(noises: Sequence[float], delta: float) -> float:
    """Epsilon at ``delta`` of a sequence of Gaussian releases with these noise multipliers (RDP accountant).

    Every release is unamplified (``NO_AMPLIFICATION``); inf when any release has no noise.
    """
    from flwr.serverapp import (
        GaussianPrivacyEvent,
        NeighboringRelation,
        PrivacyConfig,
        RdpAccountant,
        SamplingMethod,
    )

    if not noises or any(z <= 0 for z in noises):
        return float("inf")
    accountant = RdpAccountant(
        PrivacyConfig(
            target_delta=delta,
            population_size=1,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
        )
    )
    for z in noises:
        accountant.compose(GaussianPrivacyEvent(noise_multiplier=z, sample_size=1, population_size=1))
    return float(accountant.get_epsilon(delta))
