"""``atlas-ptq``: post-training quantization of a trained EuroSAT model, compared on the test fold.

Four variants of the final FedAvg model (``model.safetensors`` of a run):

- ``fp32``: as trained, saved as safetensors;
- ``fp16``: weights and compute in float16, saved as safetensors;
- ``int8-dynamic``: ``torch.ao`` dynamic quantization; it covers ``nn.Linear`` only, so the convs stay fp32;
- ``int8-static``: conv+BN+ReLU and linear+ReLU fused, every Conv2d and Linear quantized (per-channel int8
  weights, uint8 activations) with the x86 (fbgemm) backend, activations calibrated on train images.

For each: test accuracy, file size on disk, compression ratio and accuracy drop against fp32, median latency
per batch, and the communication cost of shipping that model both ways for every client and round:
``size x 2 x clients x rounds x price per MB``. Quantized models are saved with ``torch.save`` of their
state dict (quantized tensors have no safetensors dtype) and read back with ``torch.load(weights_only=True)``,
which is what the accuracy is measured on.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from atlas_flwr.common.config import EUROSAT_DATA_ENV
from atlas_flwr.common.errors import AtlasError
from atlas_flwr.common.results import RunWriter
from atlas_flwr.eurosat.data import default_npz, load_eurosat
from atlas_flwr.eurosat.model import EuroSatCNN, load_exchanged
from atlas_flwr.eurosat.train import evaluate, to_input

BACKEND = "x86"
VARIANTS = ("fp32", "fp16", "int8-dynamic", "int8-static")


def load_model(path: Path) -> tuple[EuroSatCNN, dict[str, str]]:
    """The CNN from a run's ``model.safetensors``, and the file's metadata (rounds, clients, ...)."""
    if not path.is_file():
        raise AtlasError(f"model file {str(path)!r} not found: expected a run's model.safetensors")
    with safe_open(str(path), framework="np") as fh:
        state = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118 - safe_open is not a mapping
        metadata = dict(fh.metadata() or {})
    model = EuroSatCNN()
    try:
        load_exchanged(model, state)
    except ValueError as err:
        raise AtlasError(f"model file {str(path)!r} does not hold the EuroSAT CNN: {err}") from err
    return model.eval(), metadata


def _ao():
    # torch.ao.quantization warns on import and use that it moves to torchao; the eager API still works here.
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.ao")
    warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.(ao|_utils)")
    import torch.ao.quantization as tq

    return tq


def quantize_dynamic(model: nn.Module) -> nn.Module:
    """Dynamic int8 (weights int8, activations quantized on the fly): ``nn.Linear`` only."""
    tq = _ao()
    torch.backends.quantized.engine = BACKEND
    return tq.quantize_dynamic(copy.deepcopy(model).eval(), {nn.Linear}, dtype=torch.qint8)


def quantize_static(model: EuroSatCNN, calibration: Sequence[torch.Tensor]) -> nn.Module:
    """Static int8 of every Conv2d and Linear: fuse, observe ``calibration`` batches, convert."""
    tq = _ao()
    torch.backends.quantized.engine = BACKEND
    float_model = copy.deepcopy(model).eval()
    fused = tq.fuse_modules(float_model, float_model.fusion_groups())
    fused.qconfig = tq.get_default_qconfig(BACKEND)
    prepared = tq.prepare(fused)
    with torch.no_grad():
        for batch in calibration:
            prepared(batch)
    return tq.convert(prepared)


def _reload_torch(model: nn.Module, path: Path, build: Callable[[], nn.Module]) -> nn.Module:
    torch.save(model.state_dict(), path)
    fresh = build()
    fresh.load_state_dict(torch.load(path, weights_only=True))
    return fresh.eval()


def latency_ms(model: nn.Module, batch: torch.Tensor, repeats: int) -> float:
    """Median wall time of one forward pass over ``batch`` (after one warm-up pass), in ms."""
    times = []
    with torch.no_grad():
        model(batch)
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(batch)
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


class _Half(nn.Module):
    """fp16 weights and compute; logits back in fp32."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.half()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.half()).float()


def compare(
    model: EuroSatCNN,
    test: tuple[np.ndarray, np.ndarray],
    calibration: Sequence[torch.Tensor],
    out_dir: Path,
    *,
    clients: int,
    rounds: int,
    price_per_mb: float,
    batch_size: int = 64,
    repeats: int = 10,
) -> list[dict[str, Any]]:
    """Build, save, reload and measure every variant; the rows of the comparison table."""
    out_dir.mkdir(parents=True, exist_ok=True)
    images, labels = test
    batch = to_input(images[:batch_size])
    built: dict[str, tuple[nn.Module, Path]] = {}

    path = out_dir / "model-fp32.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    built["fp32"] = (model, path)

    path = out_dir / "model-fp16.safetensors"
    save_file({k: v.half().contiguous() for k, v in model.state_dict().items() if v.is_floating_point()}, str(path))
    half = EuroSatCNN()
    with safe_open(str(path), framework="pt") as fh:
        half.load_state_dict({k: fh.get_tensor(k).float() for k in fh.keys()}, strict=False)  # noqa: SIM118
    built["fp16"] = (_Half(half.eval()), path)

    dynamic = quantize_dynamic(model)
    path = out_dir / "model-int8-dynamic.pt"
    built["int8-dynamic"] = (_reload_torch(dynamic, path, lambda: quantize_dynamic(EuroSatCNN())), path)

    static = quantize_static(model, calibration)
    path = out_dir / "model-int8-static.pt"
    built["int8-static"] = (_reload_torch(static, path, lambda: quantize_static(EuroSatCNN(), calibration[:1])), path)

    rows: list[dict[str, Any]] = []
    for name in VARIANTS:
        variant, path = built[name]
        metrics = evaluate(variant, images, labels, batch_size=batch_size)
        size = path.stat().st_size
        rows.append(
            {
                "variant": name,
                "file": path.name,
                "test-accuracy": metrics["accuracy"],
                "size-bytes": size,
                "latency-ms-per-batch": latency_ms(variant, batch, repeats),
                "communication-mb": size / 1e6 * 2 * clients * rounds,
                "communication-cost": size / 1e6 * 2 * clients * rounds * price_per_mb,
            }
        )
    base = rows[0]
    for row in rows:
        row["compression-ratio"] = base["size-bytes"] / row["size-bytes"]
        row["accuracy-drop-pt"] = 100.0 * (base["test-accuracy"] - row["test-accuracy"])
    return rows


def plot(rows: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    """Bars of size, accuracy and latency per variant, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["variant"] for r in rows]
    panels = (
        ("size-bytes", "file size (KB)", 1e-3),
        ("test-accuracy", "test accuracy (%)", 100.0),
        ("latency-ms-per-batch", "latency per batch (ms)", 1.0),
    )
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for ax, (key, label, scale) in zip(axes, panels, strict=True):
        values = [r[key] * scale for r in rows]
        ax.bar(names, values, color=["#4c72b0", "#55a868", "#c44e52", "#8172b2"][: len(names)])
        ax.set_title(label)
        ax.tick_params(axis="x", rotation=20)
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:.1f}" if scale != 100.0 else f"{v:.2f}", ha="center", va="bottom", fontsize=8)
        if key == "test-accuracy":
            low = min(values)
            ax.set_ylim(max(0.0, low - 5), 100)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(prog="atlas-ptq", description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="a run's model.safetensors")
    parser.add_argument("--data", default="", help=f"the EuroSAT npz (default: ${EUROSAT_DATA_ENV}, else ../shared)")
    parser.add_argument("--output-dir", type=Path, default=None, help="default: <model's folder>/ptq")
    parser.add_argument("--clients", type=int, default=0, help="default: from the model file's metadata")
    parser.add_argument("--rounds", type=int, default=0, help="default: from the model file's metadata")
    parser.add_argument("--price-per-mb", type=float, default=0.01, help="price of one MB on the wire (default 0.01)")
    parser.add_argument("--calibration-images", type=int, default=512, help="train images for static calibration")
    parser.add_argument("--max-test", type=int, default=0, help="cap on test images (0 = the whole test fold)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10, help="timed passes per variant (median reported)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``atlas-ptq``; writes ``config.json`` (the settings), ``ptq.json``/``.csv`` and ``ptq.png``."""
    args = build_parser().parse_args(argv)
    try:
        if min(args.calibration_images, args.batch_size, args.repeats) < 1 or args.price_per_mb < 0:
            raise AtlasError("--calibration-images, --batch-size and --repeats must be >= 1, --price-per-mb >= 0")
        model, metadata = load_model(args.model)
        clients = args.clients or int(metadata.get("clients", 0))
        rounds = args.rounds or int(metadata.get("rounds", 0))
        if clients < 1 or rounds < 1:
            raise AtlasError(f"clients = {clients}, rounds = {rounds}: pass --clients and --rounds (>= 1)")
        data = load_eurosat(args.data or os.environ.get(EUROSAT_DATA_ENV) or str(default_npz()))
        test_idx = data.test_indices(args.max_test, args.seed)
        train_idx = data.train_indices()
        calib_idx = np.sort(np.random.default_rng(args.seed).choice(train_idx, args.calibration_images, replace=False))
        calib_images = data.images(calib_idx)
        calibration = [
            to_input(calib_images[i : i + args.batch_size]) for i in range(0, len(calib_idx), args.batch_size)
        ]
        out_dir = args.output_dir or args.model.parent / "ptq"
        rows = compare(
            model,
            (data.images(test_idx), data.labels[test_idx]),
            calibration,
            out_dir,
            clients=clients,
            rounds=rounds,
            price_per_mb=args.price_per_mb,
            batch_size=args.batch_size,
            repeats=args.repeats,
        )
    except AtlasError as err:
        print(f"atlas-ptq: {err}", file=sys.stderr)
        return 2
    meta = {
        "model": str(args.model.resolve()),
        "backend": BACKEND,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "test-images": len(test_idx),
        "calibration-images": len(calib_idx),
        "batch-size": args.batch_size,
        "clients": clients,
        "rounds": rounds,
        "price-per-mb": args.price_per_mb,
    }
    writer = RunWriter(out_dir, meta)
    writer.write_table("ptq", rows)
    plot(rows, out_dir / "ptq.png", f"EuroSAT CNN PTQ ({len(test_idx)} test images, batch {args.batch_size})")
    print(f"{'variant':<13} {'accuracy':>8} {'drop pt':>7} {'KB':>8} {'ratio':>6} {'ms/batch':>9} {'comm MB':>9}")
    for r in rows:
        print(
            f"{r['variant']:<13} {r['test-accuracy']:8.4f} {r['accuracy-drop-pt']:7.2f} {r['size-bytes'] / 1e3:8.1f} "
            f"{r['compression-ratio']:6.2f} {r['latency-ms-per-batch']:9.1f} {r['communication-mb']:9.1f}"
        )
    print(f"atlas-ptq: results in {out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
