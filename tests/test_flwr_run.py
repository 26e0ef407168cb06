"""The real thing: `flwr run` on the simulation engine (Ray), via atlas-run, then its status."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def _atlas_run(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    command = [str(Path(sys.executable).with_name("atlas-run")), *args, "--app", str(ROOT)]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=900, check=False)


def _superlink_pid(output: str) -> int:
    match = re.search(r"SuperLink pid (\d+) on port", output)
    assert match, output[-2000:]
    return int(match.group(1))


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


#: The completed run below is also the uninterrupted reference of the kill-and-resume test: one run fewer.
_SMOKE = ["configs/smoke.toml", "--set", "num-server-rounds=3"]


@pytest.fixture(scope="module")
def completed(tmp_path_factory: pytest.TempPathFactory, glue_dir: str) -> tuple[Path, subprocess.CompletedProcess]:
    """One ATLAS smoke run (fingerprints, clusters, ranks, 3 rounds) through ``flwr run``: its outputs and result."""
    tmp_path = tmp_path_factory.mktemp("flwr-run")
    out = tmp_path / "outputs"
    result = _atlas_run(
        *_SMOKE,
        "--set",
        f"output-dir={json.dumps(str(out))}",
        "--set",
        "run-name=whole",
        "--set",
        f"data-dir={json.dumps(glue_dir)}",
        env_extra={"FLWR_HOME": str(tmp_path / "flwr-home")},
    )
    return out, result


def test_flwr_run_completes_writes_results_and_stops_its_superlink(completed) -> None:
    out, result = completed
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "finished:completed" in result.stdout
    assert "round 3/3" in result.stdout  # per-round progress reached the user
    run_dir = out / "whole"
    rounds = json.loads((run_dir / "rounds.json").read_text())
    assert [r["round"] for r in rounds] == [1, 2, 3] and rounds[-1]["bytes-received"] > 0
    assert (run_dir / "clients.csv").read_text().count("\n") == 3  # header + 2 clients
    assert json.loads((run_dir / "clusters.json").read_text())["clustering"] == "learned"
    assert _gone(_superlink_pid(result.stdout))
    state = re.search(r"state in (\S+)", result.stdout)
    assert state and not Path(state.group(1)).exists()  # its temporary state folder went with it


def test_sigkill_of_the_server_then_resume_gives_the_uninterrupted_result(
    tmp_path: Path, glue_dir: str, completed
) -> None:
    """Kill the ServerApp's process (flwr-simulation) with SIGKILL after round 1 of 3, resume, compare with the
    completed run of the same config."""
    import psutil

    whole_out, whole = completed
    assert whole.returncode == 0, whole.stdout[-2000:]
    out = tmp_path / "outputs"
    common = [*_SMOKE, "--set", f"data-dir={json.dumps(glue_dir)}", "--set", f"output-dir={json.dumps(str(out))}"]
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr-home")}

    command = [str(Path(sys.executable).with_name("atlas-run")), *common, "--set", "run-name=killed"]
    proc = subprocess.Popen(
        [*command, "--app", str(ROOT)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
    )
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "round 1/3" in line:  # logged after round 1's checkpoint is written
            break
    server = [
        p for p in psutil.Process(proc.pid).children(recursive=True) if "flwr-simulation" in " ".join(p.cmdline())
    ]
    assert server, "".join(seen)[-2000:]
    for p in server:
        p.send_signal(signal.SIGKILL)
    proc.terminate()  # atlas-run then stops the SuperLink and whatever is left
    proc.communicate(timeout=120)
    killed = out / "killed"
    state = json.loads((killed / "checkpoint" / "state.json").read_text())
    assert state["round"] in (1, 2), state["round"]  # the kill may land during round 2's checkpoint, never after 3
    assert not (killed / "summary.json").exists()

    resumed = _atlas_run(*common, "--set", f"resume-from={json.dumps(str(killed))}", env_extra=env)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    assert f"after round {state['round']}" in resumed.stdout

    def untimed(run_dir: Path) -> list[dict]:
        rows = json.loads((run_dir / "rounds.json").read_text())
        return [{k: v for k, v in r.items() if "seconds" not in k} for r in rows]

    assert [r["round"] for r in untimed(killed)] == [1, 2, 3]
    assert untimed(killed) == untimed(whole_out / "whole")
