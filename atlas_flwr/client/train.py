"""Local training and evaluation of a classifier; metrics through scikit-learn."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef
from torch.utils.data import DataLoader

# Not tqdm.auto: its asyncio class calls iter() on the loader twice, and each call draws from the seeded
# generator, so the batches would differ from the loader's own order (which split learning replays).
from tqdm import tqdm

from atlas_flwr.common.compute import autocast
from atlas_flwr.common.errors import AtlasError
from atlas_flwr.data.tokenize import batch_slices


def pick_device(requested: str) -> torch.device:
    """``auto`` takes CUDA when present; asking for CUDA without one is an error."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise AtlasError("device 'cuda' requested but torch sees no CUDA device: use device = 'auto' or 'cpu'")
    if requested in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def seed_for(*parts: int) -> int:
    """A 31-bit seed derived from (seed, client, round, ...): distinct streams, reproducible."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0] & 0x7FFFFFFF)


def _batches(loader: DataLoader, device: torch.device, desc: str) -> Iterator[dict[str, torch.Tensor]]:
    # tqdm shows itself only on a terminal; under the simulation engine it stays quiet.
    for batch in tqdm(loader, desc=desc, leave=False, disable=None, mininterval=5.0):
        yield {k: v.to(device) for k, v in batch.items()}


@dataclass(frozen=True)
class TrainResult:
    """What one local training call did."""

    loss: float
    num_examples: int
    steps: int
    seconds: float

    def summary(self, unit: str = "rows") -> str:
        """``loss 0.5432 on 256 rows, 16 steps, 12.3 s``, for the per-client log line."""
        return f"loss {self.loss:.4f} on {self.num_examples} {unit}, {self.steps} steps, {self.seconds:.1f} s"


def lora_pairs(model: torch.nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The trainable ``(A, B)`` weights of every LoRA module: A is (r, in), B is (out, r)."""
    params = dict(model.named_parameters())
    pairs = []
    for name, a in params.items():
        if ".lora_A." in name and a.requires_grad:
            pairs.append((a, params[name.replace(".lora_A.", ".lora_B.")]))
    return pairs


def tail_penalty(pairs: list[tuple[torch.Tensor, torch.Tensor]], gamma: float) -> torch.Tensor:
    """HetLoRA's self-pruning regulariser: sum over modules of ``||A[k:]|| * ||B[:, k:]||``, k = floor(gamma r).

    It drives the rank components that pruning would cut towards zero (``strategies.pipeline.self_prune``).
    """
    terms = []
    for a, b in pairs:
        keep = max(1, int(gamma * a.shape[0]))
        if keep < a.shape[0]:
            terms.append(a[keep:].norm() * b[:, keep:].norm())
    return torch.stack(terms).sum() if terms else torch.zeros(())


def train_local(
    model: torch.nn.Module,
    loader: DataLoader,
    *,
    epochs: int,
    lr: float,
    head_lr: float | None = None,
    weight_decay: float,
    device: torch.device,
    rank_penalty: tuple[float, float] | None = None,
) -> TrainResult:
    """AdamW on the trainable parameters (LoRA and head) for ``epochs`` passes.

    The head (parameters named ``head.*``) learns at ``head_lr`` (default: ``lr``): a fresh
    linear head on frozen-ish features needs larger steps than the low-rank adapters.
    ``rank_penalty`` = (gamma, lambda) adds ``lambda *`` :func:`tail_penalty` to the loss (HetLoRA); the
    reported loss is the task loss alone.

    Raises
    ------
    AtlasError
        When the loss becomes NaN or infinite, so no corrupt update leaves the client.
    """
    model.to(device).train()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in named if not n.startswith("head.")], "lr": lr},
        {"params": [p for n, p in named if n.startswith("head.")], "lr": head_lr or lr},
    ]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=weight_decay)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda")
    loss_fn = torch.nn.CrossEntropyLoss()
    pairs = lora_pairs(model) if rank_penalty else []
    total, seen, steps, start = 0.0, 0, 0, time.perf_counter()
    for epoch in range(epochs):
        for batch in _batches(loader, device, f"train epoch {epoch + 1}/{epochs}"):
            labels = batch.pop("labels")
            with autocast(device):
                loss = loss_fn(model(**batch), labels)
            if not math.isfinite(loss.item()):
                raise AtlasError(f"training loss became {loss.item()} at step {steps}: lower lr (now {lr})")
            optimizer.zero_grad(set_to_none=True)
            objective = loss
            if rank_penalty:
                objective = loss + rank_penalty[1] * tail_penalty(pairs, rank_penalty[0]).to(loss.device)
            scaler.scale(objective).backward()
            scaler.step(optimizer)
            scaler.update()
            total += loss.item() * len(labels)
            seen += len(labels)
            steps += 1
            # Free the graph before the next forward: backward frees what autograd saved, but not what a custom
            # Function keeps on its ctx (bitsandbytes' 8-bit matmul keeps every input there).
            del loss, objective
    model.eval()
    return TrainResult(total / max(seen, 1), seen // max(epochs, 1), steps, time.perf_counter() - start)


def classification_metrics(labels: np.ndarray, preds: np.ndarray) -> dict[str, float]:
    """Accuracy, binary/macro F1 and Matthews correlation (CoLA's official metric)."""
    binary = len(np.union1d(labels, preds)) <= 2 and set(np.unique(labels)) <= {0, 1}
    return {
        "accuracy": float(accuracy_score(labels, preds)),
        "f1": float(f1_score(labels, preds, average="binary" if binary else "macro", zero_division=0)),
        "mcc": float(matthews_corrcoef(labels, preds)),
    }


@torch.no_grad()
def evaluate(
    model: torch.nn.Module, loader: DataLoader, device: torch.device, micro_batch: int = 0
) -> dict[str, float]:
    """Loss and classification metrics over a whole loader.

    ``micro_batch`` (0: whole batches) runs each padded batch as slices of at most that many rows: the same
    logits, at the memory of a slice (the server sizes it to the client's budget).
    """
    model.to(device).eval()
    loss_fn = torch.nn.CrossEntropyLoss(reduction="sum")
    total, all_labels, all_preds = 0.0, [], []
    for whole in _batches(loader, device, "evaluate"):
        for batch in batch_slices(whole, micro_batch):
            labels = batch.pop("labels")
            with autocast(device):
                logits = model(**batch).float()
            total += loss_fn(logits, labels).item()
            all_labels.append(labels.cpu().numpy())
            all_preds.append(logits.argmax(-1).cpu().numpy())
    labels_np, preds_np = np.concatenate(all_labels), np.concatenate(all_preds)
    return {
        "loss": total / len(labels_np),
        "num-examples": float(len(labels_np)),
        **classification_metrics(labels_np, preds_np),
    }
