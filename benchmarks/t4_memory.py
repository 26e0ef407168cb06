"""Qwen2.5-0.5B on a 16 GB T4: the memory model's peak with and without the base options (issue 18).

    python benchmarks/t4_memory.py --out benchmarks/results/t4-memory

For each way of holding the base (fp32, fp16, 8-bit, 4-bit NF4, each with and without gradient
checkpointing) the predicted peak of one LoRA step (rank 8 on q_proj and v_proj in all 24 layers, AdamW,
CUDA calibration: fp16 autocast) at batch 8 x 512 tokens, and the largest batch of 512-token rows that fits
the budget. The model's shape is Qwen/Qwen2.5-0.5B's config.json (as ``memory_calibration.py`` builds its
random-init copy); nothing is downloaded. Predicted only: measuring it needs a GPU, and none was lent to
this task (``--measure`` on a CUDA machine adds measured peaks through ``memory_calibration.py``'s child).
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


def rows(budget: int) -> list[dict]:
    config = RANDOM_MODELS[MODEL]
    shape = ModelShape.from_hf_config(config, ["q_proj", "v_proj"])
    cal = Calibration.for_device("cuda")
    ranks = [RANK] * shape.num_layers
    out = []
    for name, weight_bytes, quantization in BASES:
        for checkpointing in (False, True):

            def peak(batch: int, wb: int = weight_bytes, q: str = quantization, ck: bool = checkpointing) -> dict:
                step = TrainShape(batch, SEQ, quantization=q, checkpointing=ck, weight_bytes=wb)
                return predict_peak_bytes(shape, step, ranks, calibration=cal)

            parts = peak(BATCH)
            largest = 0
            while largest < 4096 and peak(largest + 1)["total"] <= budget:
                largest += 1
            out.append(
                {
                    "base": name,
                    "gradient-checkpointing": checkpointing,
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
                }
            )
    return out


def markdown(table: list[dict]) -> str:
    lines = [
        (
            f"| base | gradient checkpointing | frozen weights GB | activations GB | predicted GB at {BATCH} x {SEQ} "
            f"| fits {BUDGET} | largest batch of {SEQ} tokens | measured GB |"
        ),
        "|---|---|---:|---:|---:|---|---:|---|",
    ]
    for r in table:
        lines.append(
            f"| {r['base']} | {'on' if r['gradient-checkpointing'] else 'off'} | {r['frozen-weights-gb']:.2f} "
            f"| {r['activations-gb']:.2f} | {r['predicted-gb']:.2f} | {'yes' if r['fits-budget'] else 'no'} "
            f"| {r['largest-batch']} | {'not measured (no GPU lent)' if r['measured-gb'] is None else r['measured-gb']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/t4-memory")
    args = parser.parse_args()
    table = rows(parse_size(BUDGET))
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {
        "command": "python benchmarks/t4_memory.py " + " ".join(sys.argv[1:]),
        "model": RANDOM_MODELS[MODEL],
        "budget": BUDGET,
        "batch": BATCH,
        "seq-len": SEQ,
        "lora-rank": RANK,
        "calibration": "Calibration.for_device('cuda')",
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
