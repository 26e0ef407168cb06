"""Weighted averaging of states (heads, factor-avg), without Flower."""

from __future__ import annotations

import numpy as np
import pytest

from strategies.aggregation import weighted_average


def _state(value: float, shape=(2, 3)) -> dict[str, np.ndarray]:
    return {"a": np.full(shape, value, dtype=np.float32), "b": np.full((4,), -value, dtype=np.float32)}


def test_weighted_average_matches_hand_computation() -> None:
    out = weighted_average([_state(1.0), _state(4.0)], [100, 50])
    np.testing.assert_allclose(out["a"], np.full((2, 3), (100 * 1 + 50 * 4) / 150))
    np.testing.assert_allclose(out["b"], np.full((4,), -2.0))
    assert out["a"].dtype == np.float32


@pytest.mark.parametrize(
    ("states", "weights", "match"),
    [
        ([_state(1.0)], [1, 2], "one weight per state"),
        ([_state(1.0), _state(2.0)], [0, 0], "not all zero"),
        ([_state(1.0), _state(2.0)], [1, -1], "non-negative"),
        ([_state(1.0), {"a": np.zeros((2, 3))}], [1, 1], "keys"),
        ([_state(1.0), _state(2.0, shape=(3, 2))], [1, 1], "different shapes"),
    ],
)
def test_weighted_average_refuses_inconsistent_input(states, weights, match) -> None:
    with pytest.raises(ValueError, match=match):
        weighted_average(states, weights)
