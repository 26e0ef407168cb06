"""How a step computes on a device: fp16 autocast on CUDA, fp32 on the CPU (both sides of split learning)."""

from __future__ import annotations

import contextlib

import torch


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """fp16 autocast on CUDA (a T4 has no fast bf16); nothing on the CPU, whose path stays fp32."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return contextlib.nullcontext()
