"""Adapters and heads <-> Flower records, and bytes counted from the real records."""

from __future__ import annotations

from collections.abc import Collection, Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message

from atlas_flwr.common.state import State


def to_record(state: Mapping[str, torch.Tensor | np.ndarray]) -> ArrayRecord:
    """An ArrayRecord with keys in sorted order (so the wire layout is deterministic)."""
    arrays = {k: (v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)) for k, v in state.items()}
    return ArrayRecord({k: Array(np.ascontiguousarray(arrays[k])) for k in sorted(arrays)})


def from_record(record: ArrayRecord) -> State:
    """numpy arrays keyed as sent."""
    return {k: arr.numpy() for k, arr in record.items()}


def to_numpy(state: Mapping[str, torch.Tensor]) -> State:
    """numpy copies of a torch state."""
    return {k: v.detach().cpu().numpy().copy() for k, v in state.items()}


def module_of(key: str) -> str:
    """The LoRA module a PEFT state key or parameter name belongs to (the part before ``.lora_``)."""
    return key.rsplit(".lora_", 1)[0]


def without_modules(state: Mapping[str, torch.Tensor | np.ndarray], modules: Collection[str]) -> dict:
    """``state`` without the tensors of ``modules`` (a client's frozen modules stay out of its reply)."""
    return {k: v for k, v in state.items() if module_of(k) not in modules}


def to_torch(state: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """torch tensors (copies) of a numpy state."""
    return {k: torch.from_numpy(np.array(v, copy=True)) for k, v in state.items()}


def message_bytes(message: Message) -> int:
    """Bytes of every ArrayRecord a message carries, as serialised for the wire."""
    if message.has_error():
        return 0
    return sum(record.count_bytes() for record in message.content.array_records.values())
