"""EuroSAT wire codecs: int8 per-channel round trip within half a step, fp16, and the bytes they save."""

from __future__ import annotations

import numpy as np
import pytest

from atlas_flwr.common.codec import decode, dequantize_int8, encode, from_wire_record, quantize_int8, to_wire_record
from atlas_flwr.eurosat.model import build_model, exchanged_state


def test_int8_round_trip_error_is_at_most_half_a_step_per_channel() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 16, 3, 3)).astype(np.float32) * rng.uniform(0.01, 10, size=(32, 1, 1, 1)).astype(
        np.float32
    )
    x[5] = 0.0  # an all-zero channel
    q, scale = quantize_int8(x)
    assert q.dtype == np.int8 and scale.shape == (32,) and np.abs(q).max() <= 127
    err = np.abs(dequantize_int8(q, scale) - x).reshape(32, -1).max(axis=1)
    peak = np.abs(x).reshape(32, -1).max(axis=1)
    assert (err <= scale / 2 * (1 + 1e-5) + 1e-12).all()
    assert (err <= peak / 254 * (1 + 1e-5)).all() and err[5] == 0.0


@pytest.mark.parametrize(("precision", "rtol"), [("fp32", 0.0), ("fp16", 1e-3), ("int8", 1 / 127)])
def test_model_state_round_trips_through_a_record(precision: str, rtol: float) -> None:
    state = exchanged_state(build_model(0))
    back = from_wire_record(to_wire_record(state, precision), precision)
    assert set(back) == set(state)
    for key, value in state.items():
        assert back[key].dtype == np.float32 and back[key].shape == value.shape
        bound = rtol * np.abs(value).max() + 1e-6
        assert np.abs(back[key] - value).max() <= bound, key


def test_int8_vectors_stay_float32_and_bytes_shrink() -> None:
    state = exchanged_state(build_model(0))
    wire = encode(state, "int8")
    assert wire["fc1.weight"].dtype == np.int8 and wire["fc1.weight:scale"].shape == (128,)
    assert wire["fc1.bias"].dtype == np.float32 and wire["features.1.running_var"].dtype == np.float32
    sizes = {p: to_wire_record(state, p).count_bytes() for p in ("fp32", "fp16", "int8")}
    assert sizes["fp16"] < 0.51 * sizes["fp32"] and sizes["int8"] < 0.27 * sizes["fp32"]


def test_malformed_payloads_are_refused() -> None:
    wire = encode({"w": np.ones((4, 3), dtype=np.float32)}, "int8")
    with pytest.raises(ValueError, match="scale shape"):
        decode({**wire, "w:scale": np.ones(3, dtype=np.float32)}, "int8")
    with pytest.raises(ValueError, match="scales without a tensor"):
        decode({"v:scale": np.ones(3, dtype=np.float32)}, "int8")
    with pytest.raises(ValueError, match="NaN"):
        decode({"w": np.array([np.nan], dtype=np.float32)}, "fp32")
    with pytest.raises(ValueError, match="precision 'int4'"):
        encode({}, "int4")
