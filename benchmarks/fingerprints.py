"""Which fingerprint signal separates GLUE tasks? Cluster clients from their fingerprints.

For each population (4 tasks x 3 clients, IID inside tasks, and Dirichlet alpha = 0.5 inside
tasks) and each signal (``embedding``, ``embedding-labels``, ``lora-grad``), with and without DP noise, every client
computes its fingerprint exactly as the ClientApp does (``local.compute_fingerprint``); the
server-side clustering (``strategies.clustering``) picks k with no task labels; the true
tasks are used only to score the result (ARI).

    python benchmarks/fingerprints.py --out benchmarks/results/fingerprints

writes ``fingerprints.json`` and ``fingerprints.csv`` there.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time
import tomllib
from pathlib import Path

import numpy as np

from atlas_flwr.client.fingerprint import FingerprintSettings
from atlas_flwr.client.local import fingerprint_features, privatize_features
from atlas_flwr.common.config import Config
from atlas_flwr.common.quiet import quiet_libraries
from strategies.clustering import adjusted_rand, cluster_fingerprints

ROOT = Path(__file__).resolve().parents[1]


def base_config(data_dir: str, overrides: dict) -> Config:
    """The app's defaults with the benchmark's population."""
    with (ROOT / "pyproject.toml").open("rb") as fh:
        values = dict(tomllib.load(fh)["tool"]["flwr"]["app"]["config"])
    values.update({"data-dir": data_dir, "output-dir": "/tmp/unused", **overrides})
    return Config.from_run_config(values)


def run_case(cfg: Config, settings: FingerprintSettings, features: list[tuple], seconds: float) -> dict:
    """Release every client's fingerprint from its features, cluster, score."""
    prints = [privatize_features(cfg, c, settings, *features[c]) for c in range(cfg.num_clients)]
    truth = [cfg.task_of(c)[0] for c in range(cfg.num_clients)]
    result = cluster_fingerprints(np.stack([p.vector for p in prints]), k_max=8, seed=cfg.seed)
    return {
        "kind": settings.kind,
        "noise": settings.noise,
        "epsilon": prints[0].epsilon if np.isfinite(prints[0].epsilon) else None,  # None: no noise
        "delta": settings.delta,
        "rows": settings.max_rows,
        "depth": settings.depth,
        "k": result.k,
        "ari": adjusted_rand(truth, result.labels),
        "silhouette": result.scores.get(result.k, {}).get("silhouette", float("nan")),
        "labels": result.labels,
        "truth": truth,
        "seconds-per-client": seconds,
        "importance-client0": [float(x) for x in prints[0].importance],
    }


def markdown_table(csv_path: Path) -> str:
    """The committed results as the markdown table of docs/results.md."""
    with csv_path.open() as fh:
        rows = list(csv.DictReader(fh))
    lines = [
        "| partition | signal | noise z | epsilon (delta 1e-5) | k chosen | ARI | silhouette |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        eps = f"{float(r['epsilon']):.2f}" if r["epsilon"] else "none"
        lines.append(
            f"| {r['partitioner']} | {r['kind']} | {r['noise']} | {eps} | {r['k']} | "
            f"{float(r['ari']):.3f} | {float(r['silhouette']):.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    """Run every case and write JSON and CSV (or, with --table, print the committed table)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "fingerprints")
    parser.add_argument("--data-dir", default=os.environ.get("ATLAS_DATA_DIR", str(ROOT.parent / "shared/data/glue")))
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--table", action="store_true", help="print the markdown table of --out and exit")
    args = parser.parse_args()
    if args.table:
        print(markdown_table(args.out / "fingerprints.csv"))
        return
    quiet_libraries()
    population = {"tasks": "sst2,mrpc,cola,qnli", "clients-per-task": 3, "max-samples-per-client": 256}
    rows = []
    for partitioner in ("iid", "dirichlet"):
        cfg = base_config(args.data_dir, {**population, "partitioner": partitioner, "dirichlet-alpha": 0.5})
        for kind in ("embedding", "embedding-labels", "lora-grad"):
            # Per-example gradients (batch 1) are slow on CPU, and this signal fails anyway: fewer rows.
            rows_used = min(args.rows, 64) if kind == "lora-grad" else args.rows
            base = FingerprintSettings(kind=kind, seed=cfg.seed, max_rows=rows_used)
            start = time.perf_counter()
            features = [fingerprint_features(cfg, c, base) for c in range(cfg.num_clients)]
            seconds = (time.perf_counter() - start) / cfg.num_clients
            for noise in (0.0, 1.0, 2.0):
                settings = FingerprintSettings(kind=kind, noise=noise, seed=cfg.seed, max_rows=rows_used)
                row = {"partitioner": partitioner, **run_case(cfg, settings, features, seconds)}
                print(
                    f"{partitioner:9s} {kind:9s} noise {noise:.1f} eps {row['epsilon']}: "
                    f"k={row['k']} ARI={row['ari']:.3f} silhouette={row['silhouette']:.3f} "
                    f"({row['seconds-per-client']:.1f} s/client)",
                    flush=True,
                )
                rows.append(row)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "fingerprints.json").write_text(json.dumps(rows, indent=2) + "\n")
    flat = [{k: v for k, v in r.items() if not isinstance(v, list)} for r in rows]
    with (args.out / "fingerprints.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(flat[0]))
        writer.writeheader()
        writer.writerows(flat)


if __name__ == "__main__":
    main()
