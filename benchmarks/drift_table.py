"""Client drift against the gap to centralized: per run, task and round, the task's metric beside its update cosine.

    python benchmarks/drift_table.py RUN_DIR [RUN_DIR ...] [--out FILE.csv]

Reads each run's ``rounds.csv``: the task's main metric and ``update-cosine-<task>`` (the cosine of two of its
clients' dW updates in one round, ``strategies/drift.py``), with the run's ``update-kept`` (the share of a
client's step length that the group's mean keeps). A cosine near 0 says the clients' updates are mostly their
own minibatch noise: averaging keeps their shared part and cancels the rest, so each round moves the model
about as far as the shared part of one client's update.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from atlas_flwr.data.glue import task_spec
from atlas_tools.report import markdown


def summarize(runs: list[Path]) -> list[dict[str, str]]:
    """One row per (run, task, round)."""
    out = []
    for run in runs:
        tasks = json.loads((run / "config.json").read_text())["run-config"]["tasks"].split(",")
        with (run / "rounds.csv").open() as fh:
            rounds = list(csv.DictReader(fh))
        for task in tasks:
            metric = task_spec(task).main_metric
            for row in rounds:
                cosine = row.get(f"update-cosine-{task}", "")
                if not cosine and len(tasks) == 1:  # one task: its pairs are the group's (runs before the per-task key)
                    cosine = row.get("update-cosine", "")
                out.append(
                    {
                        "run": run.name,
                        "task": task,
                        "round": row["round"],
                        "metric": metric,
                        "value": f"{float(row[f'{task}-{metric}']):.3f}",
                        "update cosine": f"{float(cosine):.3f}" if cosine else "",
                        "update kept (run)": f"{float(row['update-kept']):.3f}" if row.get("update-kept") else "",
                        "train loss (run)": f"{float(row['train-loss']):.3f}",
                    }
                )
    return out


def main() -> None:
    """Print the table; with --out also write it as CSV."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    missing = [str(r) for r in args.runs if not (r / "rounds.csv").is_file()]
    if missing:
        raise SystemExit(f"no rounds.csv in {missing[0]}: expected a run folder")
    rows = summarize(args.runs)
    print(markdown(rows), end="")
    if args.out:
        with args.out.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
