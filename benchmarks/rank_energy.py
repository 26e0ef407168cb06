"""Rank collapse watch: where each method's adapters keep their energy, round by round (issue 17 item 5).

    python benchmarks/rank_energy.py benchmarks/results/protocol-v2 [--out FILE.csv]

Reads every run's ``rank-energy.csv`` (per round and client: the share of the adapter's energy, the squared
singular values of every module's dW, in rank slices 1, 2, 3-4, 5-8, 9-16) and prints, per method and
client rank cap, the mean share in the two leading components (the slice every rank shares) and past
rank 4, at each round. If aggregation pushed the update into the shared leading components ("rank
collapse", arXiv 2602.13486), the leading share of the rank-8 and rank-16 clients would rise round by round.
"""

from __future__ import annotations

import argparse
import csv
import re
from collections import defaultdict
from pathlib import Path

from atlas_tools.report import markdown


def summarize(folder: Path) -> list[dict[str, str]]:
    """One row per (label, client rank, round): mean energy share in ranks 1-2 and past rank 4.

    The label is the run folder's name without its ``-s<seed>`` suffix (``benchmarks/protocol.sh``'s
    naming), so an ablation (``atlas+drop``) is its own row rather than mixed into its method's seeds.
    """
    cells: dict[tuple[str, int, int], list[tuple[float, float]]] = defaultdict(list)
    for path in sorted(folder.glob("*/rank-energy.csv")):
        method = re.sub(r"-s\d+$", "", path.parent.name)
        with path.open() as fh:
            for row in csv.DictReader(fh):
                lead = float(row.get("energy-1", 0)) + float(row.get("energy-2", 0))
                tail = sum(float(v) for k, v in row.items() if k in ("energy-5-8", "energy-9-16"))
                cells[(method, int(row["max-rank"]), int(row["round"]))].append((lead, tail))
    rows = []
    for (method, rank, rnd), values in sorted(cells.items()):
        rows.append(
            {
                "run": method,
                "client max rank": str(rank),
                "round": str(rnd),
                "clients": str(len(values)),
                "share in ranks 1-2": f"{sum(v[0] for v in values) / len(values):.3f}",
                "share past rank 4": f"{sum(v[1] for v in values) / len(values):.3f}",
            }
        )
    return rows


def main() -> None:
    """Print the table; with --out also write it as CSV."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows = summarize(args.folder)
    if not rows:
        raise SystemExit(f"no */rank-energy.csv under {args.folder}")
    print(markdown(rows), end="")
    if args.out:
        with args.out.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
