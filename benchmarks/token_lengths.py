"""How long each task's training rows are in the default model's tokens, and how many a max length cuts.

Usage: python benchmarks/token_lengths.py [--rows 2000] [--out benchmarks/results/quality-qnli/token-lengths.json]
Reads the GLUE parquet under $ATLAS_DATA_DIR (a seeded sample of each task's train split).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

from atlas_flwr.common.config import DATA_DIR_ENV
from atlas_flwr.data.glue import TASKS, load_split
from atlas_flwr.models.classifier import load_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--model", default="minilm-l6")
    parser.add_argument("--out", default="benchmarks/results/quality-qnli/token-lengths.json")
    args = parser.parse_args()
    tokenizer = load_tokenizer(args.model)
    result: dict[str, dict[str, float]] = {}
    for task, spec in TASKS.items():
        rows = load_split(task, "train", data_dir=os.environ.get(DATA_DIR_ENV, ""))
        rows = rows.shuffle(seed=0).select(range(min(args.rows, len(rows))))
        texts = [list(rows[key]) for key in spec.text_columns]
        lengths = np.array([len(ids) for ids in tokenizer(*texts)["input_ids"]])
        result[task] = {
            "rows": len(lengths),
            "median": float(np.median(lengths)),
            "p90": float(np.percentile(lengths, 90)),
            "over-64": float((lengths > 64).mean()),
            "over-128": float((lengths > 128).mean()),
        }
        print(task, result[task])
    Path(args.out).write_text(json.dumps({"model": args.model, "tasks": result}, indent=2) + "\n")


if __name__ == "__main__":
    main()
