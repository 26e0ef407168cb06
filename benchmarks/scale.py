"""Scale: 100 simulated clients with a tiny model for 3 rounds through ``flwr run`` on this machine.

    python benchmarks/scale.py --out benchmarks/results/scale      # about 10 min on 2 cores

The model is a random-init 2-layer BERT (hidden 64) saved to a temporary folder and loaded through the
normal path; 4 tasks x 25 clients, 32 rows each, the ATLAS strategy (fingerprints, clustering, budget ranks,
exact aggregation, Laplacian). Recorded: wall time end to end, the rounds' seconds, and the peak resident
memory of the whole process tree (SuperLink, ServerApp, Ray and its workers), sampled every 0.5 s with psutil
(the sum of RSS, so shared pages count once per process: an upper bound).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]


def tiny_model(folder: Path) -> str:
    """Save a random-init 2-layer BERT with MiniLM's tokenizer; return its path."""
    import torch
    from transformers import AutoModel, BertConfig

    from atlas_flwr.models.classifier import load_tokenizer

    tokenizer = load_tokenizer("minilm-l6")
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128
    )
    torch.manual_seed(0)
    AutoModel.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return str(folder)


class PeakRss(threading.Thread):
    """Samples the summed RSS of a process and all its descendants until stopped."""

    def __init__(self, pid: int, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval, self.peak, self.running = pid, interval, 0, True

    def run(self) -> None:
        while self.running:
            try:
                root = psutil.Process(self.pid)
                family = [root, *root.children(recursive=True)]
            except psutil.NoSuchProcess:
                return
            total = 0
            for proc in family:
                try:
                    total += proc.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(self.interval)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "scale")
    parser.add_argument("--clients-per-task", type=int, default=25)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    args.out = args.out.resolve()
    with tempfile.TemporaryDirectory(prefix="atlas-scale-") as tmp:
        model = tiny_model(Path(tmp) / "tiny-bert")
        sets = {
            "strategy": '"atlas"',
            "model": json.dumps(model),
            "tasks": '"sst2,mrpc,cola,qnli"',
            "clients-per-task": str(args.clients_per_task),
            "max-samples-per-client": "32",
            "max-eval-samples": "32",
            "fingerprint-rows": "32",
            "num-server-rounds": str(args.rounds),
            "batch-size": "16",
            "max-length": "32",
            "output-dir": json.dumps(str(args.out)),
            "run-name": '"run"',
        }
        command = [str(Path(sys.executable).with_name("atlas-run")), "--client-cpus", "1"]
        for key, value in sets.items():
            command += ["--set", f"{key}={value}"]
        subprocess.run(["rm", "-rf", str(args.out / "run")], check=True)
        env = {**os.environ, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
        start = time.perf_counter()
        proc = subprocess.Popen(command, cwd=ROOT, env=env)
        sampler = PeakRss(proc.pid)
        sampler.start()
        code = proc.wait()
        sampler.running = False
        wall = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"atlas-run failed with exit code {code}")
    rounds = json.loads((args.out / "run" / "rounds.json").read_text())
    summary = json.loads((args.out / "run" / "summary.json").read_text())
    result = {
        "clients": summary["clients"],
        "rounds": len(rounds),
        "wall-seconds-end-to-end": round(wall, 1),
        "plan-seconds": round(summary["plan-seconds"], 1),
        "round-seconds": [round(r["round-seconds"], 1) for r in rounds],
        "peak-rss-mb-process-tree": round(sampler.peak / 1e6),
        "clusters-k": summary["clusters-k"],
        "clusters-ari": summary["clusters-ari"],
        "failures": sum(r["failures"] for r in rounds),
        "cpus": os.cpu_count(),
    }
    (args.out / "scale.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
