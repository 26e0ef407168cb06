"""Qwen2.5-0.5B on a 16 GB T4: the memory model's peak with and without the base options (issue 18).

    python benchmarks/t4_memory.py --out benchmarks/results/t4-memory

For each way of holding the base (fp32, fp16, 8-bit, 4-bit NF4, each with and without gradient
checkpointing) the predicted peak of one LoRA step (rank 8 on q_proj and v_proj in all 24 layers, AdamW,
CUDA calibration: fp16 autocast) at batch 8 x 512 tokens, and the largest batch of 512-token rows that fits
the budget. The model's shape is Qwen/Qwen2.5-0.5B's config.json (as ``memory_calibration.py`` builds its
random-init copy); nothing is downloaded. ``--measure`` (on a GPU machine: ``benchmarks/gpu_checks.sh``)
also runs each row's step in a fresh process through ``memory_calibration.py``'s child and records
``torch.cuda.max_memory_allocated`` above the baseline beside the prediction; no GPU has been lent to run
it yet, so the committed table is predicted only. ``--measure --device cpu --batch 1 --seq 16`` checks the
plumbing on a CPU (peak RSS, not a T4 figure).
Writes ``t4-memory.json``, ``t4-memory.csv`` and prints the markdown table.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from memory_calibration import RANDOM_MODELS

from atlas_flwr.common.devices import parse_size
from strategies.memory import Calibration, ModelShape, TrainShape, predict_peak_bytes

MODEL = "qwen2.5-0.5b-random"
#: A T4's 16 GB (15,360 MiB as nvidia-smi reports it) less about 0.5 GiB for the CUDA context, which the
#: memory model leaves out: what tensors may use.
BUDGET = "14.5GiB"
SEQ, BATCH, RANK = 512, 8, 8
#: (name, bytes per non-quantized base weight, quantization)
BASES = [("fp32", 4, "none"), ("fp16", 2, "none"), ("8bit", 2, "8bit"), ("4bit", 2, "4bit")]


def rows(budget: int, batch: int = BATCH, seq: int = SEQ) -> list[dict]:
    config = RANDOM_MODELS[MODEL]
    shape = ModelShape.from_hf_config(config, ["q_proj", "v_proj"])
    cal = Calibration.for_device("cuda")
    ranks = [RANK] * shape.num_layers
    out = []
    for name, weight_bytes, quantization in BASES:
        for checkpointing in (False, True):

            def peak(rows_: int, wb: int = weight_bytes, q: str = quantization, ck: bool = checkpointing) -> dict:
                step = TrainShape(rows_, seq, quantization=q, checkpointing=ck, weight_bytes=wb)
                return predict_peak_bytes(shape, step, ranks, calibration=cal)

            parts = peak(batch)
            largest = 0
            while largest < 4096 and peak(largest + 1)["total"] <= budget:
                largest += 1
            out.append(
                {
                    "base": name,
                    "gradient-checkpointing": checkpointing,
                    "batch": batch,
                    "seq-len": seq,
                    "frozen-weights-gb": round(parts["frozen_weights"] / 1e9, 3),
                    "adapter-and-optimizer-mb": round(
                        (parts["lora_params"] + parts["lora_grads"] + parts["optimizer_state"]) / 1e6, 1
                    ),
                    "activations-gb": round(parts["activations"] / 1e9, 3),
                    "weight-casts-gb": round(parts["weight_casts"] / 1e9, 3),
                    "predicted-gb": round(parts["total"] / 1e9, 3),
                    "fits-budget": parts["total"] <= budget,
                    "largest-batch": largest,
                    "measured-gb": None,
                    "measured-error": None,
                }
            )
    return out


def row_name(row: dict) -> str:
    """``fp16``, ``fp16-ckpt``, ...: how ``--only`` names a row."""
    return f"{row['base']}{'-ckpt' if row['gradient-checkpointing'] else ''}"


def measure(table: list[dict], device: str, steps: int, only: list[str] | None = None) -> None:
    """Fill ``measured-gb`` and ``measured-error`` (prediction against measurement) of every row, each step in
    a fresh process (``memory_calibration.run_config``)."""
    import tempfile
    from types import SimpleNamespace

    from memory_calibration import prepare_models, run_config

    bases = {name: (weight_bytes, quantization) for name, weight_bytes, quantization in BASES}
    args = SimpleNamespace(steps=steps, threads=1, malloc="pinned", device=device)
    with tempfile.TemporaryDirectory() as tmp:
        path = prepare_models(Path(tmp), {MODEL})[MODEL]
        for row in table:
            if only and row_name(row) not in only:
                continue
            weight_bytes, quantization = bases[row["base"]]
            options = {
                "base_dtype": "fp32" if weight_bytes == 4 else "fp16",
                "quantization": quantization,
                "checkpointing": row["gradient-checkpointing"],
            }
            name = row_name(row)
            ranks = [RANK] * RANDOM_MODELS[MODEL]["num_hidden_layers"]
            measured = run_config(name, MODEL, path, row["batch"], row["seq-len"], ranks, args, 0, options)["measured"]
            row["measured-gb"] = round(measured / 1e9, 3)
            row["measured-error"] = round((row["predicted-gb"] * 1e9 - measured) / measured, 4)
            print(f"{name}: predicted {row['predicted-gb']:.2f} GB, measured {measured / 1e9:.2f} GB", flush=True)


def markdown(table: list[dict]) -> str:
    lines = [
        (
            f"| base | gradient checkpointing | frozen weights GB | activations GB | predicted GB at {table[0]['batch']} x {table[0]['seq-len']} "
            f"| fits {BUDGET} | largest batch of {SEQ} tokens | measured GB |"
        ),
        "|---|---|---:|---:|---:|---|---:|---|",
    ]
    for r in table:
        lines.append(
            f"| {r['base']} | {'on' if r['gradient-checkpointing'] else 'off'} | {r['frozen-weights-gb']:.2f} "
            f"| {r['activations-gb']:.2f} | {r['predicted-gb']:.2f} | {'yes' if r['fits-budget'] else 'no'} "
            f"| {r['largest-batch']} | "
            + ("not measured (no GPU lent)" if r["measured-gb"] is None else f"{r['measured-gb']:.2f}")
            + " |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/t4-memory")
    parser.add_argument("--measure", action="store_true", help="measure every row (fresh process each)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="where --measure runs")
    parser.add_argument("--steps", type=int, default=2, help="training steps per measured row")
    parser.add_argument("--batch", type=int, default=BATCH, help="rows per step (the T4 table: 8)")
    parser.add_argument("--seq", type=int, default=SEQ, help="tokens per row (the T4 table: 512)")
    parser.add_argument("--only", nargs="*", help="rows to measure, e.g. fp32 fp16-ckpt 4bit (default: all)")
    args = parser.parse_args()
    table = rows(parse_size(BUDGET), args.batch, args.seq)
    if args.measure:
        measure(table, args.device, args.steps, args.only)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {
        "command": "python benchmarks/t4_memory.py " + " ".join(sys.argv[1:]),
        "model": RANDOM_MODELS[MODEL],
        "budget": BUDGET,
        "batch": args.batch,
        "seq-len": args.seq,
        "lora-rank": RANK,
        "calibration": "Calibration.for_device('cuda')",
        "measured": f"{args.device}, {args.steps} steps, fresh process per row" if args.measure else None,
        "rows": table,
    }
    (args.out / "t4-memory.json").write_text(json.dumps(meta, indent=2) + "\n")
    with (args.out / "t4-memory.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    print(markdown(table))


if __name__ == "__main__":
    main()
