"""Aggregation math on plain numpy states (no Flower imports): tested alone, fast."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

State = Mapping[str, np.ndarray]


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
