"""Local training and evaluation of the EuroSAT CNN, in the compute precision of the run."""

from __future__ import annotations

import contextlib
import time

import numpy as np
import torch
from torch import nn

from atlas_flwr.client.train import TrainResult
from atlas_flwr.eurosat.data import MEAN, STD

_MEAN = torch.tensor(MEAN).view(1, 3, 1, 1)
_STD = torch.tensor(STD).view(1, 3, 1, 1)


def to_input(images: np.ndarray, device: torch.device | str = "cpu") -> torch.Tensor:
    """(n, 64, 64, 3) uint8 -> normalized (n, 3, 64, 64) float32 on ``device``."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float().div_(255.0)
    return (x - _MEAN.to(device)) / _STD.to(device)


def autocast_for(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """fp16 precision: fp16 autocast on CUDA, bf16 autocast on CPU (CPU kernels have no fast fp16 path)."""
    if precision != "fp16":
        return contextlib.nullcontext()
    dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
    return torch.autocast(device.type, dtype=dtype)


def _flip(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    # Satellite tiles have no up or left: random horizontal and vertical flips are free labels.
    h = torch.rand(len(x), generator=gen) < 0.5
    v = torch.rand(len(x), generator=gen) < 0.5
    x = torch.where(h.view(-1, 1, 1, 1).to(x.device), x.flip(3), x)
    return torch.where(v.view(-1, 1, 1, 1).to(x.device), x.flip(2), x)


def train_local(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    precision: str,
    device: torch.device,
    seed: int,
) -> TrainResult:
    """SGD with momentum 0.9 over ``epochs`` shuffled passes, flips as augmentation.

    Deterministic given ``seed`` (shuffling, flips and dropout draw from it) on CPU.
    """
    start = time.perf_counter()
    model.to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and precision == "fp16")
    gen = torch.Generator().manual_seed(seed)
    y_all = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    losses, steps = [], 0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _ in range(epochs):
            order = torch.randperm(len(labels), generator=gen)
            for lo in range(0, len(order), batch_size):
                idx = order[lo : lo + batch_size].numpy()
                x = _flip(to_input(images[idx], device), gen)
                y = y_all[idx].to(device)
                with autocast_for(precision, device):
                    loss = nn.functional.cross_entropy(model(x), y)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                losses.append(float(loss.detach()))
                steps += 1
    return TrainResult(
        float(np.mean(losses)) if losses else float("nan"), len(labels), steps, time.perf_counter() - start
    )


@torch.no_grad()
def predict(model: nn.Module, images: np.ndarray, *, batch_size: int, device: torch.device | str = "cpu") -> np.ndarray:
    """Logits (n, classes) as float32 numpy, in eval mode."""
    model.to(device).eval()
    out = [
        model(to_input(images[lo : lo + batch_size], device)).float().cpu() for lo in range(0, len(images), batch_size)
    ]
    return torch.cat(out).numpy() if out else np.zeros((0, 0), dtype=np.float32)


def evaluate(
    model: nn.Module, images: np.ndarray, labels: np.ndarray, *, batch_size: int, device: torch.device | str = "cpu"
) -> dict[str, float]:
    """Accuracy and mean cross-entropy on ``images``."""
    logits = torch.from_numpy(predict(model, images, batch_size=batch_size, device=device))
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    return {
        "accuracy": float((logits.argmax(1) == y).float().mean()),
        "loss": float(nn.functional.cross_entropy(logits, y)),
    }
