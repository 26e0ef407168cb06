"""One paired table of ablations: each variant against the run it changes one switch of (issue 17).

    python benchmarks/ablation_pairs.py benchmarks/results/protocol-v2 [--readme docs/results.md]

Each row pairs a variant with its partner on every (seed, task) both have: the per-task differences of
the final main metric (mean over seeds), their mean, and wins / ties / losses. With ``--readme`` the
table goes into that file between ``<!-- atlas-report:protocol-v2-ablations -->`` markers.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from atlas_tools.report import MAIN_METRIC, final_scores, find_runs, markdown, write_sections

#: (variant, partner, what the variant changes)
PAIRS = [
    ("atlas-no-laplacian+aggregation=zero-pad", "atlas-no-laplacian", "zero-pad aggregation (HetLoRA's) for exact"),
    ("atlas-no-laplacian+aggregation=svd-dense", "atlas-no-laplacian", "dense SVD (FlexLoRA's) for exact"),
    (
        "atlas+frozen-layers=drop+laplacian=median,held",
        "atlas+laplacian=median,held",
        "drop the layers a device cannot train, for using them frozen",
    ),
]


def table(folders: list[Path]) -> list[dict[str, str]]:
    runs = find_runs(folders)
    scores, tasks = final_scores(runs), runs[0].tasks
    rows = []
    for variant, partner, change in PAIRS:
        if variant not in scores or partner not in scores:
            continue
        keys = sorted(set(scores[variant]) & set(scores[partner]))
        diff = {k: scores[variant][k] - scores[partner][k] for k in keys}
        seeds = sorted({s for s, _ in keys})
        row = {"variant": variant, "against": partner, "change": change, "seeds": str(len(seeds))}
        for task in tasks:
            values = [d for (s, t), d in diff.items() if t == task]
            row[f"{task} {MAIN_METRIC[task]}"] = f"{np.mean(values):+.3f}" if values else ""
        values = np.array(list(diff.values()))
        row["mean difference"] = f"{values.mean():+.4f}"
        row["wins / ties / losses"] = f"{(values > 0).sum()} / {(values == 0).sum()} / {(values < 0).sum()}"
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--readme", type=Path, help="write the table into this markdown file's section")
    args = parser.parse_args()
    body = markdown(table(args.folders))
    print(body)
    if args.readme:
        write_sections(args.readme, {"protocol-v2-ablations": body})


if __name__ == "__main__":
    main()
