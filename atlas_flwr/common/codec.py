"""Wire formats (``precision``) of both workloads: what a model or an update looks like in an ArrayRecord.

- ``fp32``: every tensor as float32.
- ``fp16``: every tensor as float16.
- ``int8``: every tensor of two or more dimensions (conv and linear weights, 99.8 % of the CNN)
  as int8 with one float32 scale per output channel (symmetric, round to nearest, so the error of
  each element is at most half its channel's scale); vectors (biases, BN) stay float32, as they
  are tiny and BN's running variance does not survive a shared scale.

The server encodes the global model, the clients encode their update (new weights minus the
weights they received): updates are much smaller than weights, so int8 loses far less on them.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord

from atlas_flwr.common.config import PRECISIONS
from atlas_flwr.common.state import State

SCALE_SUFFIX = ":scale"


def quantize_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-output-channel int8: ``x ~ q * scale[:, None, ...]``; returns ``(q, scale)``."""
    flat = np.asarray(x, dtype=np.float32).reshape(x.shape[0], -1)
    peak = np.abs(flat).max(axis=1)
    # An all-zero channel gets scale 1 (its codes are 0 anyway); never divide by zero.
    scale = np.where(peak > 0, peak / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(flat / scale[:, None]), -127, 127).astype(np.int8)
    return q.reshape(x.shape), scale


def dequantize_int8(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """float32 values of :func:`quantize_int8` codes."""
    shape = (-1,) + (1,) * (q.ndim - 1)
    return q.astype(np.float32) * scale.reshape(shape)


def encode(state: Mapping[str, np.ndarray], precision: str) -> State:
    """The arrays that travel for ``state`` in ``precision`` (keys sorted; scales as ``<key>:scale``)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    out: State = {}
    for key in sorted(state):
        value = np.asarray(state[key], dtype=np.float32)
        if precision == "fp16":
            out[key] = value.astype(np.float16)
        elif precision == "int8" and value.ndim >= 2:
            out[key], out[key + SCALE_SUFFIX] = quantize_int8(value)
        else:
            out[key] = value
    return out


def decode(wire: Mapping[str, np.ndarray], precision: str) -> State:
    """float32 tensors back from :func:`encode`'s arrays; raises ValueError on a malformed payload."""
    out: State = {}
    for key, value in wire.items():
        if key.endswith(SCALE_SUFFIX):
            continue
        scale_key = key + SCALE_SUFFIX
        if precision == "int8" and scale_key in wire:
            if value.dtype != np.int8 or wire[scale_key].shape != (value.shape[0],):
                raise ValueError(f"int8 tensor {key!r}: dtype {value.dtype}, scale shape {wire[scale_key].shape}")
            out[key] = dequantize_int8(value, np.asarray(wire[scale_key], dtype=np.float32))
        else:
            out[key] = np.asarray(value, dtype=np.float32)
        if not np.isfinite(out[key]).all():
            raise ValueError(f"tensor {key!r} holds NaN or Inf")
    orphans = [k for k in wire if k.endswith(SCALE_SUFFIX) and k[: -len(SCALE_SUFFIX)] not in wire]
    if orphans:
        raise ValueError(f"scales without a tensor: {orphans[:3]}")
    return out


def to_wire_record(state: Mapping[str, np.ndarray], precision: str) -> ArrayRecord:
    """An ArrayRecord of ``state`` in ``precision``."""
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in encode(state, precision).items()})


def from_wire_record(record: ArrayRecord, precision: str) -> State:
    """float32 tensors of a record written by :func:`to_wire_record`."""
    return decode({k: arr.numpy() for k, arr in record.items()}, precision)


def held_by_client(state: Mapping[str, np.ndarray], precision: str) -> State:
    """What a client holds after receiving ``state`` in ``precision`` (``state`` itself for fp32)."""
    if precision == "fp32":
        return dict(state)
    return decode(encode(state, precision), precision)


def encode_update(new: Mapping[str, np.ndarray], received: Mapping[str, np.ndarray], precision: str) -> ArrayRecord:
    """A client's reply: its new weights in fp32 (exact), else its update ``new - received`` in ``precision``.

    Updates are far smaller than weights, so a shared per-channel scale loses far less on them.
    """
    if precision == "fp32":
        return to_wire_record(new, precision)
    if set(new) != set(received):
        raise ValueError(f"update keys differ from the received ones: {sorted(set(new) ^ set(received))[:3]}")
    return to_wire_record({k: np.asarray(new[k], np.float32) - received[k] for k in new}, precision)


def decode_update(record: ArrayRecord, received: Mapping[str, np.ndarray], precision: str) -> State:
    """The client's new weights from :func:`encode_update`'s record and what it had ``received``."""
    update = from_wire_record(record, precision)
    if precision == "fp32":
        return update
    # Keys or shapes that differ from ``received`` are reported by the caller's validation.
    return {k: (received[k] + v if k in received and received[k].shape == v.shape else v) for k, v in update.items()}
