"""One run of either workload through the real ServerApp/ClientApp code on the in-process LocalGrid.

python benchmarks/inprocess.py configs/eurosat-fp16.toml --output-dir DIR --run-name NAME
    [--data eurosat_rgb_jpeg.npz] [--set KEY=VALUE ...]
python benchmarks/inprocess.py configs/quality.toml --output-dir DIR --run-name NAME --set server-lr=2

No SuperLink and no Ray: for machines where ``flwr run`` cannot go (the GPU machines lent to this
project take 64 MiB per call, and Ray alone is larger), and for quick ablations on 2 cores. The
rounds, the messages and the bytes counted on them are those of ``flwr run``; the clients train one
after another in this process instead of in Ray workers.
Beside the run's usual files it writes ``runtime.json`` (engine, device, torch) and ``wall-clock.txt``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from atlas_flwr.client.train import pick_device
from atlas_flwr.client_app import app as client_app
from atlas_flwr.common.config import Config
from atlas_flwr.eurosat.server import run_eurosat
from atlas_flwr.server.preflight import preflight
from atlas_flwr.server_app import run_federation
from atlas_tools.cli import resolve_run_config
from atlas_tools.local_grid import LocalGrid

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    """Run one config in-process and write its results, ``runtime.json`` and ``wall-clock.txt``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--run-name", required=True)
    parser.add_argument("--data", type=Path, help="the EuroSAT npz (default: eurosat-data, then ../shared)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    overrides = [*args.overrides, f'output-dir="{args.output_dir.resolve()}"', f'run-name="{args.run_name}"']
    if args.data is not None:
        overrides.append(f'eurosat-data="{args.data.resolve()}"')
    values = resolve_run_config(ROOT, args.config, overrides)
    cfg = Config.from_run_config(values)
    preflight(cfg)
    device = pick_device(cfg.device)
    start = time.perf_counter()
    grid = LocalGrid(client_app, values, cfg.num_clients)
    run_dir = run_eurosat(grid, cfg) if cfg.workload == "eurosat" else run_federation(grid, cfg).run_dir
    seconds = time.perf_counter() - start
    runtime = {
        "engine": "in-process LocalGrid (benchmarks/inprocess.py)",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "seconds": seconds,
    }
    (run_dir / "runtime.json").write_text(json.dumps(runtime, indent=2) + "\n")
    line = f"{args.run_name}: {seconds:.0f} s end to end ({runtime['engine']}, {runtime['device']})"
    (run_dir / "wall-clock.txt").write_text(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
