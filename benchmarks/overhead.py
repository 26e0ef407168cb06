"""Framework overhead: the same rounds in a plain PyTorch/PEFT loop and through ``flwr run`` (simulation).

    python benchmarks/overhead.py --out benchmarks/results/overhead             # about 5 min on 2 cores
    python benchmarks/overhead.py --threads 1 --out benchmarks/results/overhead/threads-1

Both sides run the same FedAvg rounds of the same clients with the same functions: every client trains
with ``atlas_flwr.client.local.run_train`` (PEFT LoRA on MiniLM-L6, seeded per client and round), the server
aggregates with ``strategies.pipeline.PersonalizedPipeline`` and evaluates with ``atlas_flwr.client.local.run_evaluate``
once per group of identical models. The plain loop calls them directly, one client after the other, in one
process, with ``--threads`` torch threads; ``flwr run`` (``atlas-run``) moves every adapter and head through
Flower messages, with one ClientApp at a time (Ray is given exactly ``--threads`` CPUs, one client's worth)
and ``OMP_NUM_THREADS=--threads`` in it. Whatever else the machine has (the SuperLink, the ServerApp, Ray's
own processes) runs beside. Compared: the rounds' wall time (the plain loop's against the sum of
``round-seconds`` in ``rounds.json``; goal: ratio <= 1.15), and the share of the server's own phases
(aggregation; the rest of a round is the clients' training and evaluation and the messages) in the round time
(goal <= 2%). Start-up (SuperLink, Ray, the first model load) is reported separately.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SETTING = {
    "strategy": "fedavg",
    "tasks": "sst2,mrpc",
    "clients-per-task": 2,
    "max-samples-per-client": 128,
    "max-eval-samples": 128,
    "num-server-rounds": 3,
}


def plain_loop(values: dict) -> dict:
    """The rounds without Flower: train, aggregate, evaluate, timed per phase."""
    from atlas_flwr.client.local import client_data, initial_state, run_evaluate, run_train
    from atlas_flwr.common.config import Config
    from atlas_flwr.common.records import to_numpy
    from atlas_flwr.common.state import state_digest
    from strategies.pipeline import (
        PRESETS,
        Member,
        PersonalizedPipeline,
        Update,
    )

    cfg = Config.from_run_config(values)
    ids = list(range(cfg.num_clients))
    members = [Member(i, cfg.task_of(i)[0], 0) for i in ids]
    start = tuple(to_numpy(s) for s in initial_state(cfg))
    strategy = PersonalizedPipeline(
        cfg.strategy, PRESETS[cfg.strategy], members, dict.fromkeys(ids, start), cfg.lora_alpha
    )
    rounds = []
    for server_round in range(1, cfg.num_server_rounds + 1):
        t0 = time.perf_counter()
        updates, compute = [], 0.0
        for cid in ids:
            adapter, head, result = run_train(cfg, cid, server_round, *strategy.state_for(cid))
            compute += result.seconds
            updates.append(
                Update(cid, to_numpy(adapter), to_numpy(head), result.num_examples, {"train-loss": result.loss})
            )
        t1 = time.perf_counter()
        strategy.aggregate_train(updates)
        t2 = time.perf_counter()
        seen: dict[tuple, dict] = {}
        for cid in ids:
            key = (state_digest(*strategy.state_for(cid)), client_data(cfg, cid).eval_digest)
            if key not in seen:
                seen[key] = run_evaluate(cfg, cid, *strategy.state_for(cid))
        t3 = time.perf_counter()
        rounds.append(
            {
                "round": server_round,
                "train": t1 - t0,
                "client-train": compute,
                "aggregate": t2 - t1,
                "evaluate": t3 - t2,
                "total": t3 - t0,
            }
        )
        print(f"plain round {server_round}: {t3 - t0:.1f} s", flush=True)
    return {"rounds": rounds}


def flower(values: dict, out: Path, threads: int) -> dict:
    """The same rounds through atlas-run; round times from rounds.json."""
    gpus = "1" if values["device"] == "cuda" else "0"
    # Ray gets one client's CPUs, so ClientApps run one at a time, as in the plain loop.
    command = [sys.executable, "-m", "atlas_tools.cli", "--client-cpus", str(threads), "--ray-cpus", str(threads)]
    command += ["--client-gpus", gpus]
    for key, value in {**values, "output-dir": str(out), "run-name": "flwr"}.items():
        if key != "data-dir":
            command += ["--set", f"{key}={json.dumps(value)}"]
    subprocess.run(["rm", "-rf", str(out / "flwr")], check=True)
    env = {**os.environ, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    start = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True, env=env)
    wall = time.perf_counter() - start
    rows = json.loads((out / "flwr" / "rounds.json").read_text())
    summary = json.loads((out / "flwr" / "summary.json").read_text())
    return {"end-to-end": wall, "plan-seconds": summary["plan-seconds"], "rounds": rows}


def machine(device: str) -> dict:
    """What the numbers were measured on."""
    import torch

    info = {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(), "torch": torch.__version__}
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "overhead")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (and Ray CPUs) of the one client")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the clients train")
    args = parser.parse_args()
    if args.threads < 1:
        parser.error(f"--threads {args.threads}: expected an integer >= 1")
    # The same thread environment on both sides, set before torch loads here: Ray sets OMP_NUM_THREADS in its
    # workers, and OpenMP reads it (with its spin-wait defaults) at start-up, not on torch.set_num_threads.
    os.environ |= {"OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    assert "torch" not in sys.modules
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    from atlas_tools.cli import resolve_run_config

    values = resolve_run_config(ROOT, None, [f"{k}={json.dumps(v)}" for k, v in SETTING.items()])
    values["output-dir"] = str(out)
    values["device"] = args.device
    t0 = time.perf_counter()
    plain = plain_loop(values)
    plain["end-to-end"] = time.perf_counter() - t0
    flwr_run = flower(values, out, args.threads)
    plain_rounds = sum(r["total"] for r in plain["rounds"])
    flwr_rounds = sum(r["round-seconds"] for r in flwr_run["rounds"])
    server = sum(r["aggregate-seconds"] for r in flwr_run["rounds"])
    # Round 1 loads the model and data in each worker: rounds 2.. are the steady state.
    steady_plain = sum(r["total"] for r in plain["rounds"][1:])
    steady_flwr = sum(r["round-seconds"] for r in flwr_run["rounds"][1:])
    result = {
        "setting": SETTING,
        "threads": args.threads,
        "device": args.device,
        "machine": machine(args.device),
        "plain-round-seconds": [round(r["total"], 2) for r in plain["rounds"]],
        "flwr-round-seconds": [round(r["round-seconds"], 2) for r in flwr_run["rounds"]],
        "ratio-all-rounds": round(flwr_rounds / plain_rounds, 3),
        "ratio-rounds-2-on": round(steady_flwr / steady_plain, 3),
        "server-phase-share": round(server / flwr_rounds, 4),
        # Where the difference is: the clients' own training (run_train's clock, summed over clients) in
        # each, and what a round's train and evaluate phases take beyond it.
        "plain-train-phase-seconds": [round(r["train"], 2) for r in plain["rounds"]],
        "flwr-train-phase-seconds": [round(r["train-seconds"], 2) for r in flwr_run["rounds"]],
        "plain-client-train-seconds": [round(r["client-train"], 2) for r in plain["rounds"]],
        "flwr-client-train-seconds": [
            (round(r["client-train-seconds"], 2) if "client-train-seconds" in r else None) for r in flwr_run["rounds"]
        ],
        "plain-eval-phase-seconds": [round(r["evaluate"], 2) for r in plain["rounds"]],
        "flwr-eval-phase-seconds": [round(r["eval-seconds"], 2) for r in flwr_run["rounds"]],
        "plain-end-to-end-seconds": round(plain["end-to-end"], 1),
        "flwr-end-to-end-seconds": round(flwr_run["end-to-end"], 1),
        "flwr-plan-seconds": round(flwr_run["plan-seconds"], 2),
    }
    (out / "overhead.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
