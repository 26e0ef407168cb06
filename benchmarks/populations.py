"""Does clustering find the tasks in real populations? Unequal clients per task, 5 tasks, Dirichlet alpha 0.3.

Every client computes its fingerprint as the ClientApp does (``local.fingerprint_features`` and
``privatize_features``: the ``embedding`` signal (the default) and ``embedding-labels``, 256 rows, no
noise and noise multiplier 1);
the server-side clustering picks k with no task labels (silhouette, k_max 8); the declared tasks only
score the result (ARI). Where tasks merge, the row names them.

    python benchmarks/populations.py --out benchmarks/results/populations     # about 3 min on 2 cores

writes ``populations.json`` and ``populations.csv``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np

from atlas_flwr.client.fingerprint import FingerprintSettings
from atlas_flwr.client.local import fingerprint_features, privatize_features
from atlas_flwr.common.quiet import quiet_libraries
from strategies.clustering import adjusted_rand, cluster_fingerprints

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.fingerprints import base_config

KINDS = ("embedding", "embedding-labels")
POPULATIONS = {
    "unequal-4-tasks": {"tasks": "sst2,mrpc,cola,qnli", "clients-per-task": "sst2:4,mrpc:2,cola:3,qnli:1"},
    "5-tasks": {"tasks": "sst2,mrpc,cola,qnli,rte", "clients-per-task": 2},
    "5-tasks-unequal-dirichlet-0.3": {
        "tasks": "sst2,mrpc,cola,qnli,rte",
        "clients-per-task": "sst2:3,mrpc:2,cola:2,qnli:2,rte:1",
        "partitioner": "dirichlet",
        "dirichlet-alpha": 0.3,
    },
    "4-tasks-dirichlet-0.3": {
        "tasks": "sst2,mrpc,cola,qnli",
        "clients-per-task": 3,
        "partitioner": "dirichlet",
        "dirichlet-alpha": 0.3,
    },
}


def merges(truth: list[str], labels: list[int]) -> list[str]:
    """Clusters that hold more than one task, as ``"mrpc+rte"`` (by majority task of each client)."""
    out = []
    for cluster in sorted(set(labels)):
        tasks = sorted({t for t, label in zip(truth, labels, strict=True) if label == cluster})
        if len(tasks) > 1:
            out.append("+".join(tasks))
    return out


def main() -> None:
    """Fingerprint, cluster and score every population; write JSON and CSV."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "populations")
    parser.add_argument("--data-dir", default=os.environ.get("ATLAS_DATA_DIR", str(ROOT.parent / "shared/data/glue")))
    parser.add_argument("--kinds", default=",".join(KINDS), help="fingerprint kinds, comma-separated")
    args = parser.parse_args()
    quiet_libraries()
    rows = []
    for name, population, kind in [(n, p, k) for n, p in POPULATIONS.items() for k in args.kinds.split(",")]:
        cfg = base_config(args.data_dir, {"max-samples-per-client": 768, **population})
        base = FingerprintSettings(kind=kind, seed=cfg.seed, max_rows=256)
        start = time.perf_counter()
        features = [fingerprint_features(cfg, c, base) for c in range(cfg.num_clients)]
        seconds = (time.perf_counter() - start) / cfg.num_clients
        truth = [cfg.task_of(c)[0] for c in range(cfg.num_clients)]
        for noise in (0.0, 1.0):
            settings = FingerprintSettings(kind=kind, noise=noise, seed=cfg.seed, max_rows=256)
            prints = [privatize_features(cfg, c, settings, *features[c]) for c in range(cfg.num_clients)]
            result = cluster_fingerprints(np.stack([p.vector for p in prints]), k_max=8, seed=cfg.seed)
            row = {
                "population": name,
                "kind": kind,
                "tasks": population["tasks"],
                "clients-per-task": str(population["clients-per-task"]),
                "partitioner": cfg.partitioner,
                "dirichlet-alpha": cfg.dirichlet_alpha if cfg.partitioner == "dirichlet" else None,
                "clients": cfg.num_clients,
                "noise": noise,
                "epsilon": prints[0].epsilon if np.isfinite(prints[0].epsilon) else None,
                "true-k": len(set(truth)),
                "k": result.k,
                "ari": adjusted_rand(truth, result.labels),
                "merged": " ".join(merges(truth, list(result.labels))) or "-",
                "split-tasks": " ".join(
                    t
                    for t, n in Counter(truth).items()
                    if len({lab for tt, lab in zip(truth, result.labels, strict=True) if tt == t}) > 1
                )
                or "-",
                "seconds-per-client": seconds,
                "labels": list(map(int, result.labels)),
                "truth": truth,
            }
            print(
                f"{name:30s} {kind:16s} noise {noise:.0f}: k={row['k']} (true {row['true-k']}) ARI={row['ari']:.3f} "
                f"merged {row['merged']} split {row['split-tasks']}",
                flush=True,
            )
            rows.append(row)
        write(args.out, rows)  # after every population: an interrupted run keeps what it measured


def write(out: Path, rows: list[dict]) -> None:
    """``populations.json`` and ``populations.csv`` (the CSV without the per-client lists)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "populations.json").write_text(json.dumps(rows, indent=2) + "\n")
    flat = [{k: v for k, v in r.items() if not isinstance(v, list)} for r in rows]
    with (out / "populations.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(flat[0]))
        writer.writeheader()
        writer.writerows(flat)


if __name__ == "__main__":
    main()
