"""Print the default-settings table of docs/results.md from the committed default-experiment runs.

python benchmarks/default_table.py [benchmarks/results/default]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

COLUMNS = [("sst2", "accuracy"), ("mrpc", "f1"), ("mrpc", "accuracy"), ("cola", "mcc"), ("qnli", "accuracy")]


def row(run: Path) -> str:
    """One markdown row: final per-task metrics, bytes per round, time."""
    rounds = json.loads((run / "rounds.json").read_text())
    final = rounds[-1]
    strategy = json.loads((run / "config.json").read_text())["run-config"]["strategy"]
    cells = [strategy, str(final["round"])]
    cells += [f"{final[f'{task}-{metric}']:.3f}" for task, metric in COLUMNS]
    cells.append(f"{final['bytes-sent'] / 1e6:.2f} / {final['bytes-received'] / 1e6:.2f}")
    cells.append(f"{sum(r['round-seconds'] for r in rounds) / len(rounds):.0f}")
    wall = run / "wall-clock.txt"
    cells.append(wall.read_text().split(":")[1].split("s end")[0].strip() if wall.is_file() else "")
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    """Print the table for every run directory under the given folder."""
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/default")
    header = ["strategy", "rounds", *[f"{t} {m}" for t, m in COLUMNS], "MB down / up per round", "s per round"]
    header.append("s end to end")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for run in sorted(p for p in root.iterdir() if (p / "rounds.json").is_file()):
        print(row(run))


if __name__ == "__main__":
    main()
