"""The EuroSAT CNN: a stride-2 stem, three conv-BN-ReLU-pool blocks and a two-layer head, ready for eager PTQ.

Why this net rather than the seed's 434,602-parameter one: this machine has 2 CPU cores, so the
convolutions are narrow (16-32-64-128 channels) and the stem convolves with stride 2 (64 -> 32 pixels):
about 15 M multiply-adds per 64x64 image, and no full-resolution activation map, which on this CPU
trains about 1.35x faster than a stride-1 stem with pooling. Most parameters sit in the cheap 2048-128
linear layer (361,242 in all). Every conv+BN+ReLU and linear+ReLU can be fused, and the quant/dequant
stubs are identities until ``torch.ao.quantization.convert``, so the same module is trained in fp32
and statically quantized.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from atlas_flwr.eurosat.data import IMAGE_SIZE, NUM_CLASSES

WIDTHS = (16, 32, 64, 128)
HIDDEN = 128


class EuroSatCNN(nn.Module):
    """Conv(stride 2)-BN-ReLU, then Conv-BN-ReLU-MaxPool x 3 (64 -> 4 pixels), flatten, Linear-ReLU, dropout,
    Linear."""

    def __init__(self, widths: tuple[int, ...] = WIDTHS, hidden: int = HIDDEN, dropout: float = 0.3) -> None:
        super().__init__()
        self.quant = torch.ao.quantization.QuantStub()
        layers: list[nn.Module] = []
        channels = 3
        for i, width in enumerate(widths):
            stem = i == 0
            layers += [nn.Conv2d(channels, width, 3, stride=2 if stem else 1, padding=1, bias=False)]
            layers += [nn.BatchNorm2d(width), nn.ReLU()] + ([] if stem else [nn.MaxPool2d(2)])
            channels = width
        self.features = nn.Sequential(*layers)
        side = IMAGE_SIZE // 2 ** len(widths)
        self.fc1 = nn.Linear(channels * side * side, hidden)
        self.relu = nn.ReLU()
        self.dropout = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden, NUM_CLASSES)
        self.dequant = torch.ao.quantization.DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of normalized (n, 3, 64, 64) images."""
        x = self.features(self.quant(x))
        x = self.dropout(self.relu(self.fc1(torch.flatten(x, 1))))
        return self.dequant(self.fc2(x))

    def fusion_groups(self) -> list[list[str]]:
        """Module names that ``torch.ao.quantization.fuse_modules`` merges (conv+bn+relu, fc1+relu)."""
        convs = [i for i, m in enumerate(self.features) if isinstance(m, nn.Conv2d)]
        return [[f"features.{i}", f"features.{i + 1}", f"features.{i + 2}"] for i in convs] + [["fc1", "relu"]]


def build_model(seed: int) -> EuroSatCNN:
    """The CNN with its initial weights drawn from ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return EuroSatCNN()


def exchanged_state(model: nn.Module) -> dict[str, np.ndarray]:
    """The floating-point tensors of the state dict as numpy (BN's integer batch counter stays home)."""
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items() if v.is_floating_point()}


def load_exchanged(model: nn.Module, state: dict[str, np.ndarray]) -> None:
    """Load what :func:`exchanged_state` gave; any other difference in keys is an error."""
    expected = set(exchanged_state(model))
    if set(state) != expected:
        diff = sorted(set(state) ^ expected)
        raise ValueError(f"state keys differ from the model's: {diff[:3]}")
    model.load_state_dict({k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in state.items()}, strict=False)


def num_parameters(model: nn.Module) -> int:
    """Trainable parameters."""
    return sum(p.numel() for p in model.parameters())
