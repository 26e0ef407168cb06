"""`flwr run` through atlas-run when a run ends badly: a failed ServerApp, SIGTERM, a dying SuperLink.

A module of its own beside tests/test_flwr_run.py, so that pytest-xdist can run the two on separate workers.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.test_flwr_run import _atlas_run, _gone, _superlink_pid

pytestmark = pytest.mark.slow


def test_a_failed_serverapp_is_reported_as_failed(tmp_path: Path, glue_dir: str) -> None:
    # Every train reply of round 1 fails on purpose (inject-failures, drawn per seed, client and round: both
    # clients of seed 42 fail), so the ServerApp stops with "every client failed" after it started: a failure
    # that preflight cannot see, as opposed to a bad config, which atlas-run refuses before anything starts.
    result = _atlas_run(
        "configs/smoke.toml",
        "--set",
        "inject-failures=0.9",
        "--set",
        'strategy="fedavg"',
        "--set",
        f"output-dir={json.dumps(str(tmp_path / 'outputs'))}",
        "--set",
        f"data-dir={json.dumps(glue_dir)}",
        env_extra={"FLWR_HOME": str(tmp_path / "flwr-home")},
    )
    assert result.returncode == 1, result.stdout[-2000:]
    assert "finished:failed" in result.stderr and "every client failed in 'train'" in result.stderr
    assert _gone(_superlink_pid(result.stdout))


def _start_long_run(tmp_path: Path, glue_dir: str) -> tuple[subprocess.Popen, list[str]]:
    """``atlas-run`` of a 100-round fedavg smoke run, read until round 1 is logged: its process and output so far."""
    command = [
        str(Path(sys.executable).with_name("atlas-run")),
        "configs/smoke.toml",
        # fedavg: no fingerprint phase before round 1, which the caller waits for
        *("--set", "num-server-rounds=100", "--set", 'strategy="fedavg"'),
        *("--set", f"output-dir={json.dumps(str(tmp_path / 'outputs'))}"),
        *("--set", f"data-dir={json.dumps(glue_dir)}", "--app", str(ROOT)),
    ]
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr-home")}
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "round 1/100" in line:
            break
    return proc, seen


def test_sigterm_mid_run_stops_every_process_it_started(tmp_path: Path, glue_dir: str) -> None:
    import psutil

    proc, seen = _start_long_run(tmp_path, glue_dir)
    family = psutil.Process(proc.pid).children(recursive=True)
    assert any("flwr-simulation" in " ".join(p.cmdline()) for p in family), "".join(seen)[-2000:]
    proc.terminate()
    proc.communicate(timeout=120)
    _, alive = psutil.wait_procs(family, timeout=30)
    assert not alive, [" ".join(p.cmdline())[:80] for p in alive]


def test_a_superlink_that_dies_mid_run_leaves_no_process_and_no_folder_behind(tmp_path: Path, glue_dir: str) -> None:
    import psutil

    proc, seen = _start_long_run(tmp_path, glue_dir)
    state = Path(re.search(r"state in (\S+)", "".join(seen)).group(1))
    assert state.is_dir()
    family = psutil.Process(proc.pid).children(recursive=True)
    links = [p for p in family if "flower-superlink" in " ".join(p.cmdline())]
    assert len(links) == 1 and any("flwr-simulation" in " ".join(p.cmdline()) for p in family), "".join(seen)[-2000:]
    links[0].kill()
    rest, _ = proc.communicate(timeout=180)
    assert proc.returncode == 2, rest[-2000:]
    assert "the SuperLink (pid" in rest and "exited with code" in rest
    _, alive = psutil.wait_procs([p for p in family if p.is_running()], timeout=30)
    assert not alive, [" ".join(p.cmdline())[:80] for p in alive]
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(tmp_path) in " ".join(p.info["cmdline"] or [])]
    assert not state.exists()  # the SuperLink's state folder goes with it
