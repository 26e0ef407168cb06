"""Task fingerprints computed on a client: projected, clipped, optionally noised statistics.

No raw row and no raw per-example gradient leaves the client. Each example gives a feature
vector, which is projected to ``dim`` with a Gaussian matrix drawn from a seed every client
shares, clipped to L2 norm ``clip``, and averaged; Gaussian noise of std
``noise * 2 * clip / n`` on the mean (``noise`` times the mean's sensitivity when one row is
replaced) makes the release (epsilon, delta)-DP per example.

Three signals, all usable at round 0:

``embedding``
    The frozen model's mean-pooled hidden states ``e`` at depth ``depth`` (a fraction of the
    layers), averaged: what the client's text looks like. Measured on GLUE with MiniLM-L6
    (``benchmarks/fingerprints.py``): intermediate layers separate tasks better than the last
    one (silhouette 0.78 at layer 4 against 0.65 at layer 6, Dirichlet alpha 0.5, 256 rows),
    and 64 rows are too few under strong label skew while 256 rows give ARI 1.0.
``embedding-labels``
    ``e`` and its label-signed copy
    ``(2y - 1) e``, each row weighted by its inverse class frequency: the mean is then the
    class-balanced mean (what the text looks like) and half the difference of the class means
    (which direction separates the labels; a zero-initialised probe head's gradient points
    there). Without the weights, clients of one task with different label mixes (Dirichlet
    partitions) get different fingerprints.
``lora-grad``
    Per-example gradients of the loss with respect to the LoRA ``B`` factors at
    initialisation. ``A`` gradients are useless here: with ``B = 0`` they are exactly zero.

Both also give a per-layer importance (mean squared LoRA-B gradient per layer), used to
allocate ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader

from atlas_flwr.data.tokenize import batch_slices
from atlas_flwr.models.classifier import SequenceClassifier, pool

FINGERPRINT_KINDS = ("embedding", "embedding-labels", "lora-grad")


@dataclass(frozen=True)
class FingerprintSettings:
    """How a fingerprint is made; every client of a run uses the same settings."""

    kind: str = "embedding"
    dim: int = 64
    clip: float = 1.0
    noise: float = 0.0
    delta: float = 1e-5
    seed: int = 0
    max_rows: int = 256
    depth: float = 0.67

    def __post_init__(self) -> None:
        if self.kind not in FINGERPRINT_KINDS:
            raise ValueError(f"unknown fingerprint kind {self.kind!r}: expected one of {', '.join(FINGERPRINT_KINDS)}")
        if not 0.0 <= self.depth <= 1.0:
            raise ValueError(f"fingerprint depth {self.depth!r} is invalid: expected a fraction in [0, 1]")


@dataclass(frozen=True)
class Fingerprint:
    """What a client sends: the private vector, per-layer importance, and its privacy cost."""

    vector: np.ndarray
    importance: np.ndarray
    num_rows: int
    epsilon: float
    delta: float


def projection(in_dim: int, out_dim: int, seed: int) -> np.ndarray:
    """The shared Johnson-Lindenstrauss matrix (in_dim x out_dim), N(0, 1/out_dim) entries."""
    rng = np.random.default_rng([seed, in_dim, out_dim])
    return rng.standard_normal((in_dim, out_dim), dtype=np.float32) / np.float32(np.sqrt(out_dim))


def class_balance_weights(labels: np.ndarray) -> np.ndarray:
    """Per-row weights ``n / (K n_y)``: every class present counts the same in a weighted mean."""
    classes, counts = np.unique(labels, return_counts=True)
    per_class = dict(zip(classes.tolist(), (len(labels) / (len(classes) * counts)).tolist(), strict=True))
    return np.array([per_class[y] for y in labels.tolist()])


def privatize(
    features: np.ndarray, settings: FingerprintSettings, noise_seed: int, weights: np.ndarray | None = None
) -> tuple[np.ndarray, float]:
    """Project, clip per row, take the (weighted) mean, add Gaussian noise; return it and its epsilon.

    Parameters
    ----------
    features : ndarray
        One row per example (n x D).
    settings : FingerprintSettings
        Projection dim and seed, clip norm, noise multiplier, delta.
    noise_seed : int
        Seed of this client's noise (must differ between clients).
    weights : ndarray, optional
        Per-row weights with mean 1 (e.g. :func:`class_balance_weights`); the largest one
        scales the sensitivity.

    Returns
    -------
    tuple
        The fingerprint (``dim``,) and epsilon at ``settings.delta`` (inf without noise).
    """
    if features.ndim != 2 or len(features) == 0 or not np.isfinite(features).all():
        raise ValueError(f"features must be a finite non-empty (n, D) array: got shape {features.shape}")
    projected = features.astype(np.float32) @ projection(features.shape[1], settings.dim, settings.seed)
    norms = np.linalg.norm(projected, axis=1, keepdims=True)
    clipped = projected * np.minimum(1.0, settings.clip / np.maximum(norms, 1e-12))
    n = len(features)
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    mean = (w[:, None] * clipped).sum(axis=0).astype(np.float32) / np.float32(n)
    if settings.noise <= 0:
        return mean, float("inf")
    rng = np.random.default_rng(noise_seed)
    # One row replaced moves the weighted mean of clipped rows by at most 2 * clip * max(w) / n.
    sensitivity = 2.0 * settings.clip * float(w.max()) / n
    mean = mean + rng.normal(0.0, settings.noise * sensitivity, size=mean.shape).astype(np.float32)
    return mean, epsilon_of(settings.noise, n, settings.delta)


def epsilon_of(noise: float, num_rows: int, delta: float) -> float:
    """Epsilon of one Gaussian release with noise ``noise`` x sensitivity (Flower's RDP accountant).

    The noise is already scaled to the replace-one sensitivity, so this is the plain Gaussian
    mechanism: no sampling amplification (all ``num_rows`` rows are used, so their number does not
    enter), one release (:func:`atlas_flwr.common.dp.run_epsilon`).
    """
    from atlas_flwr.common.dp import run_epsilon

    return run_epsilon([noise], delta)


def _lora_b_params(model: SequenceClassifier) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.backbone.named_parameters() if "lora_B" in n]


def layer_of(name: str) -> int:
    """The block index in a PEFT module or parameter name (``...layer.3.attention...`` -> 3)."""
    # PEFT module names carry the block index right after "layer", "layers" or "h".
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part in ("layer", "layers", "h") and parts[i + 1].isdigit():
            return int(parts[i + 1])
    raise ValueError(f"cannot find a layer index in parameter name {name!r}")


def example_features(
    model: SequenceClassifier,
    loader: DataLoader,
    kind: str,
    device: torch.device,
    max_rows: int,
    depth: float = 1.0,
    micro_batch: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-example feature rows for ``kind``, their labels, and the per-layer importance.

    Embeddings are read at hidden state ``round(depth * num_layers)``. The loader must have
    batch size 1 for ``lora-grad`` (per-example gradients). ``micro_batch`` (0: the whole batch)
    runs each batch as slices of at most that many rows and sums their gradients: the same
    features and importance as the whole batch (to float rounding), at the memory of a slice,
    so that a client's fingerprint fits the budget its server priced it for.
    """
    model.to(device).eval()  # no dropout: the fingerprint describes the data, not noise
    b_params = _lora_b_params(model)
    layers = sorted({layer_of(n) for n, _ in b_params})
    importance = np.zeros(len(layers))
    rows: list[np.ndarray] = []
    row_labels: list[int] = []
    loss_fn = torch.nn.CrossEntropyLoss()
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        labels = batch["labels"]
        model.zero_grad(set_to_none=True)
        parts = []
        for part in batch_slices(batch, micro_batch):
            with torch.enable_grad():
                kwargs = {k: part[k] for k in ("input_ids", "attention_mask")}
                if "token_type_ids" in part and model._accepts_token_types:
                    kwargs["token_type_ids"] = part["token_type_ids"]
                states = model.backbone(**kwargs, output_hidden_states=True).hidden_states
                pooled = pool(states[-1], part["attention_mask"], model.pooling)
                # The slice's share of the batch's mean loss: the slices' gradients add up to the batch's.
                loss = loss_fn(model.head(pooled), part["labels"]) * (len(pooled) / len(labels))
                at = pool(states[round(depth * (len(states) - 1))], part["attention_mask"], model.pooling)
                parts.append(at.detach())
                loss.backward()
            del states, pooled, loss, at  # free the slice's graph before the next one is built
        at_depth = torch.cat(parts)
        per_layer = np.zeros(len(layers))
        for name, param in b_params:
            per_layer[layers.index(layer_of(name))] += float(param.grad.pow(2).sum())
        importance += per_layer * len(labels)
        row_labels.extend(labels.cpu().tolist())
        if kind == "embedding":
            rows.extend(at_depth.detach().cpu().numpy())
        elif kind == "embedding-labels":
            signed = (2.0 * labels.float() - 1.0).unsqueeze(1)
            rows.extend(torch.cat([at_depth, signed * at_depth], dim=1).detach().cpu().numpy())
        else:
            rows.append(torch.cat([p.grad.flatten() for _, p in b_params]).cpu().numpy())
        if len(rows) >= max_rows:
            break
    model.zero_grad(set_to_none=True)
    return np.stack(rows[:max_rows]), np.array(row_labels[:max_rows]), importance / max(len(rows), 1)
