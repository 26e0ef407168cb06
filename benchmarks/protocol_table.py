"""Print the README's ATLAS comparison table from the committed protocol runs.

python benchmarks/protocol_table.py [benchmarks/results/protocol]

Per run (a method, or a method with one switch changed): clusters found, final per-task metrics,
the mean of each task's main metric, the worst client's main metric, how many clients' predicted
peak memory exceeds their device budget, bytes per round and time.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

COLUMNS = [("sst2", "accuracy"), ("mrpc", "f1"), ("mrpc", "accuracy"), ("cola", "mcc"), ("qnli", "accuracy")]
MAIN = {"sst2": "accuracy", "mrpc": "f1", "cola": "mcc", "qnli": "accuracy", "rte": "accuracy"}
ORDER = [
    "local-only",
    "fedavg",
    "fedavg-cluster",
    "atlas-no-laplacian",
    "atlas",
    "atlas-no-laplacian+zero-pad",
    "atlas-no-laplacian+factor-avg",
    "fedavg-cluster+split-auto",
    "fedavg+fp16",
    "fedavg+int8",
]


def _wall(run: Path) -> str:
    wall = run / "wall-clock.txt"
    return wall.read_text().split(":")[1].split("s end")[0].strip() if wall.is_file() else ""


def row(run: Path) -> list[str]:
    """One table row."""
    rounds = json.loads((run / "rounds.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    clients = json.loads((run / "clients.json").read_text())
    ranks = json.loads((run / "ranks.json").read_text())
    final = rounds[-1]
    ari = summary.get("clusters-ari")
    cells = [run.name, f"{summary['clusters-k']}" + (f" / {ari:.2f}" if ari is not None else "")]
    cells += [f"{final[f'{task}-{metric}']:.3f}" for task, metric in COLUMNS]
    cells.append(f"{final['mean-main-metric']:.3f}")
    cells.append(f"{min(c[MAIN[c['task']]] for c in clients):.3f}")
    if (run / "split.json").is_file():  # a split client holds only its bottom: its own prediction
        budget = {r["client-id"]: r["memory-budget-bytes"] for r in ranks}
        split = json.loads((run / "split.json").read_text())
        over = sum(s["client-predicted-bytes"] > budget[s["client-id"]] for s in split)
    else:
        over = sum(not r["fits-budget"] for r in ranks)
    cells.append(f"{over} / {len(ranks)}")
    cells.append(f"{final['bytes-sent'] / 1e6:.2f} / {final['bytes-received'] / 1e6:.2f}")
    cells.append(f"{sum(r['round-seconds'] for r in rounds) / len(rounds):.0f}")
    cells.append(_wall(run))
    return cells


def main() -> None:
    """Print the table for every run directory under the given folder, methods in ORDER first."""
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/protocol")
    runs = [p for p in root.iterdir() if (p / "summary.json").is_file()]
    runs.sort(key=lambda p: (ORDER.index(p.name) if p.name in ORDER else len(ORDER), p.name))
    header = ["run", "k / ARI", *[f"{t} {m}" for t, m in COLUMNS], "mean main", "worst client"]
    header += ["clients over budget", "MB down / up per round", "s per round", "s end to end"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for run in runs:
        print("| " + " | ".join(row(run)) + " |")


if __name__ == "__main__":
    main()
