"""One paired table of ablations: each variant against the run it changes one switch of (issues 17 and 18).

    python benchmarks/ablation_pairs.py [RUN_OR_FOLDER ...] [--readme docs/results.md]

Without arguments it reads protocol v2's runs: ``benchmarks/results/protocol-v2/`` and the runs of
``benchmarks/results/protocol-v2-levers/`` that :data:`LEVER_RUNS` names (that folder also holds runs of
other configs). Each row pairs a variant with its partner on every (seed, task) both have: the per-task
differences of the final main metric (mean over seeds), their mean, wins / ties / losses, and the Wilcoxon
signed-rank p over those units. With ``--readme`` the table goes into that file between
``<!-- atlas-report:protocol-v2-ablations -->`` markers.
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
    ("atlas+local-epochs-by-task=qnli:2", "atlas", "two local epochs a round for QNLI's clients (the QNLI lever)"),
    ("centralized+local-epochs-by-task=qnli:2", "centralized", "the same two epochs a round for the reference"),
    ("fedavg-cluster+local-epochs-by-task=qnli:2", "fedavg-cluster", "the QNLI lever on the best baseline"),
    (
        "atlas+local-epochs-by-task=qnli:2",
        "fedavg-cluster+local-epochs-by-task=qnli:2",
        "ATLAS against the best baseline, both with the QNLI lever",
    ),
    ("atlas+local-epochs-by-task=cola:2", "atlas", "two local epochs a round for CoLA's clients (a CoLA lever)"),
    (
        "atlas+server-lr-rule=keep-length",
        "atlas",
        "the server step by rule: each group's mean update at its members' mean length (CoLA's lever)",
    ),
    ("atlas+server-lr-rule=keep-length", "fedavg-cluster", "ATLAS with that rule against the best baseline"),
    ("atlas-split", "atlas", "all four phases: split learning (split = auto) added to atlas"),
    ("atlas-split", "fedavg-cluster+split=auto", "budget ranks, exact aggregation and the Laplacian, both split"),
]
#: The protocol v2 runs of ``protocol-v2-levers/`` the table reads (globs; the folder holds other configs too).
LEVER_RUNS = (
    "atlas+graph-cluster+aggregate-s4?",
    "atlas+graph-cluster+aggregate+qnli-epochs-2-s4?",
    "centralized+qnli-epochs-2-s4?",
    "atlas+graph-cluster+aggregate+cola-epochs-2-s4?",
    "atlas+graph-cluster+aggregate+keep-length-s4?",
    "fedavg-cluster+qnli-epochs-2-s4?",
    "atlas-split+graph-cluster+aggregate-s4?",
    "fedavg-cluster+split-auto-s4?",
)


def default_runs() -> list[Path]:
    """protocol v2's folder and the named runs of its levers' folder."""
    levers = ROOT / "benchmarks/results/protocol-v2-levers"
    return [ROOT / "benchmarks/results/protocol-v2", *sorted(p for g in LEVER_RUNS for p in levers.glob(g))]


def table(folders: list[Path]) -> list[dict[str, str]]:
    from scipy.stats import wilcoxon

    runs = find_runs(folders)
    scores = final_scores(runs)
    rows = []
    for variant, partner, change in PAIRS:
        if variant not in scores or partner not in scores:
            continue
        tasks = next(r.tasks for r in runs if r.method == partner)
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
        row["Wilcoxon p"] = f"{wilcoxon(values).pvalue:.3g}" if np.any(values != 0) else ""
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folders", nargs="*", type=Path, help="runs or folders of runs (default: protocol v2's)")
    parser.add_argument("--readme", type=Path, help="write the table into this markdown file's section")
    args = parser.parse_args()
    body = markdown(table(args.folders or default_runs()))
    print(body)
    if args.readme:
        write_sections(args.readme, {"protocol-v2-ablations": body})


if __name__ == "__main__":
    main()
