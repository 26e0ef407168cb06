"""``atlas-run``: run the app on the local simulation engine, offline, and check it finished.

It fills in what ``flwr run .`` cannot know (absolute data and output paths, the number of
simulated SuperNodes), validates the config before anything starts, runs the app on a
SuperLink it owns, checks the run's final status with ``flwr list``, and stops the SuperLink.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from atlas_flwr.common.config import DATA_DIR_ENV, EUROSAT_DATA_ENV, Config
from atlas_flwr.common.errors import AtlasError
from atlas_flwr.common.results import default_run_name
from atlas_flwr.server.preflight import preflight
from atlas_tools.launch import LocalSuperLink, run_status, stream_flwr_run


def app_defaults(app: Path) -> dict[str, Any]:
    """``[tool.flwr.app.config]`` of the app's pyproject."""
    path = app / "pyproject.toml"
    if not path.is_file():
        raise AtlasError(f"no pyproject.toml in {str(app)!r}: expected the ATLAS-FL project directory (--app)")
    with path.open("rb") as fh:
        return dict(tomllib.load(fh)["tool"]["flwr"]["app"]["config"])


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``key=value`` pairs, values parsed as TOML (``lr=0.01``, ``tasks='sst2,cola'``)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise AtlasError(f"override {item!r} is not key=value")
        try:
            out[key.strip()] = tomllib.loads(f"v = {raw.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = raw.strip()  # a bare word is a string
    return out


def resolve_run_config(app: Path, config_file: Path | None, overrides: Sequence[str]) -> dict[str, Any]:
    """Defaults, then the config file, then ``--set`` overrides; paths made absolute."""
    values = app_defaults(app)
    if config_file is not None:
        if not config_file.is_file():
            raise AtlasError(f"config file {str(config_file)!r} not found: expected a TOML file of run-config keys")
        with config_file.open("rb") as fh:
            from_file = tomllib.load(fh)
        unknown = sorted(set(from_file) - set(values))
        if unknown:
            raise AtlasError(f"config file {str(config_file)!r} has unknown keys {unknown}")
        values.update(from_file)
    values.update(parse_overrides(overrides))
    if not values.get("data-dir"):
        shared = app.parent / "shared" / "data" / "glue"
        values["data-dir"] = os.environ.get(DATA_DIR_ENV) or (str(shared) if shared.is_dir() else "")
    if not values.get("eurosat-data"):
        npz = app.parent / "shared" / "data" / "eurosat" / "eurosat_rgb_jpeg.npz"
        values["eurosat-data"] = os.environ.get(EUROSAT_DATA_ENV) or (str(npz) if npz.is_file() else "")
    for key in ("data-dir", "output-dir", "eurosat-data", "resume-from"):
        if values.get(key):
            values[key] = str(Path(values[key]).expanduser().resolve())
    if values.get("log-dir") not in (None, "none", "run"):
        values["log-dir"] = str(Path(values["log-dir"]).expanduser().resolve())
    if not values.get("output-dir"):
        values["output-dir"] = str((app / "outputs").resolve())
    if not values.get("run-name"):
        seed = values.get("seed", 0)  # a bad seed is reported by the config check, in one line
        values["run-name"] = default_run_name(str(values.get("strategy")), seed if isinstance(seed, int) else 0)
    return values


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(prog="atlas-run", description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", type=Path, help="a run-config TOML file (e.g. configs/smoke.toml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--app", type=Path, default=Path.cwd(), help="project directory (default: cwd)")
    parser.add_argument("--client-cpus", type=int, default=2, help="CPUs per simulated ClientApp (Ray)")
    parser.add_argument("--client-gpus", type=float, default=0.0, help="GPUs per simulated ClientApp (Ray)")
    parser.add_argument(
        "--ray-cpus",
        type=int,
        default=None,
        help="CPUs Ray may hand out (default: all); with --client-cpus it bounds how many ClientApps run at once",
    )
    parser.add_argument("--check", action="store_true", help="validate the config, print it and exit")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``atlas-run``; returns the process exit code."""
    args = build_parser().parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so the SuperLink context manager still stops its group.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        if args.ray_cpus is not None and args.ray_cpus < args.client_cpus:
            raise AtlasError(
                f"--ray-cpus {args.ray_cpus} is below --client-cpus {args.client_cpus}: no ClientApp could start"
            )
        app = args.app.resolve()
        values = resolve_run_config(app, args.config, args.overrides)
        cfg = Config.from_run_config(values)
        preflight(cfg)
        # A resumed run goes on writing in the checkpointed run's directory.
        run_dir = Path(values["resume-from"] or Path(values["output-dir"]) / values["run-name"])
        if args.check:
            print("\n".join(f"{k} = {v!r}" for k, v in values.items()))
            return 0
        federation = {
            "num_supernodes": cfg.num_clients,
            "client_resources_num_cpus": args.client_cpus,
            "client_resources_num_gpus": args.client_gpus,
        }
        if args.ray_cpus is not None:
            federation["init_args_num_cpus"] = args.ray_cpus
        with LocalSuperLink() as link:
            print(
                f"atlas-run: SuperLink pid {link.process.pid} on port {link.port}, state in {link.workdir}", flush=True
            )
            run_id = stream_flwr_run(link, app, values, federation)
            status = run_status(link, run_id)
    except AtlasError as err:
        print(f"atlas-run: {err}", file=sys.stderr)
        return 2
    if status.get("status") != "finished:completed":
        print(f"atlas-run: run {run_id} ended {status.get('status')}: {status.get('status-details')}", file=sys.stderr)
        return 1
    print(f"atlas-run: run {run_id} finished:completed in {status.get('elapsed', 0):.0f} s; results in {run_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
