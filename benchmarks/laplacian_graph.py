"""What the Laplacian pulls: a run's fingerprint graph under both bandwidths (issue 17, the Laplacian lever).

    python benchmarks/laplacian_graph.py benchmarks/results/protocol-v2/atlas-s42 [--out FILE.csv]

Reads the run's ``adjacency.json`` (the graph it ran with, ``a_kl = exp(-d_kl^2 / s2)``) and
``clusters.json`` (the learned groups), recovers the distances as ``d_kl^2 / s2 = -ln a_kl``, and gives the
weights each pair of groups gets under ``laplacian-graph = median`` (what the run used, when it ran
with the default) and ``cluster`` (the bandwidth set by the pairs inside a group). No model runs.
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np


def group_weights(run: Path) -> list[dict[str, str]]:
    """Per pair of groups: the mean edge weight between their clients under each bandwidth."""
    a = np.asarray(json.loads((run / "adjacency.json").read_text())["a"], dtype=np.float64)
    clusters = json.loads((run / "clusters.json").read_text())
    groups = clusters["groups"]
    config = json.loads((run / "config.json").read_text())["run-config"]
    if config.get("laplacian-graph", "median") != "median":
        raise SystemExit(f"{run} ran with laplacian-graph = {config['laplacian-graph']}: expected median")
    n = len(groups)
    scaled = -np.log(np.where(np.eye(n, dtype=bool), 1.0, a))  # d^2 / s2 under the median bandwidth
    inside = [scaled[k, j] for k in range(n) for j in range(k + 1, n) if groups[k] == groups[j]]
    ratio = float(np.median(inside))  # the cluster bandwidth over the median one
    tight = np.exp(-scaled / ratio)
    with (run / "ranks.csv").open() as fh:  # client order, with each client's declared task (for naming only)
        declared = [r["task"] for r in csv.DictReader(fh)]
    names = {g: "+".join(sorted({t for t, h in zip(declared, groups, strict=True) if h == g})) for g in groups}
    rows = []
    labels = sorted(set(groups))
    for x in labels:
        for y in labels:
            if y < x:
                continue
            pairs = [(k, j) for k in range(n) for j in range(n) if k != j and groups[k] == x and groups[j] == y]
            rows.append(
                {
                    "groups": f"{names[x]} - {names[y]}",
                    "median bandwidth": f"{np.mean([a[p] for p in pairs]):.3g}",
                    "cluster bandwidth": f"{np.mean([tight[p] for p in pairs]):.3g}",
                }
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows = group_weights(args.run)
    print("| " + " | ".join(rows[0]) + " |\n|" + "---|" * len(rows[0]))
    for row in rows:
        print("| " + " | ".join(row.values()) + " |")
    if args.out:
        with args.out.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


if __name__ == "__main__":
    main()
