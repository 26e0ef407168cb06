"""scripts/slurm/submit.sh against a real one-node SLURM cluster on localhost (munged, slurmctld, slurmd).

The cluster is the test's own: its munge key and socket, its slurm.conf on free ports, its state
and spool folders; no cgroups (proctrack/linuxproc, task/none), so it runs in a container as root.
Without slurm-wlm and munge installed (Debian packages) the test is skipped, unless
ATLAS_REQUIRE_SLURM=1 (CI), which turns that into a failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from atlas_tools.launch import free_port, stop_family
from tests.conftest import ROOT

pytestmark = pytest.mark.slow
DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel", "sinfo")


def _missing_slurm() -> str | None:
    missing = [d for d in DAEMONS if shutil.which(d) is None and not Path("/usr/sbin", d).exists()]
    if missing:
        return f"not installed: {missing} (apt-get install slurm-wlm munge)"
    if os.geteuid() != 0:
        return "slurmd runs jobs as their user: the test cluster needs root"
    return None


def _bin(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _slurm_conf(root: Path, host: str) -> str:
    return f"""ClusterName=atlastest
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
AuthType=auth/munge
AuthInfo=socket={root}/run/munge.sock
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
# No cgroups in a container: track job processes by parentage, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={root}/jobcomp.txt
MinJobAge=600
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
SlurmdParameters=config_overrides
NodeName={host} NodeAddr=127.0.0.1 CPUs=2 RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


@pytest.fixture(scope="module")
def slurm_env() -> Iterator[dict[str, str]]:
    """A running one-node cluster; yields the environment (SLURM_CONF) its commands need."""
    if reason := _missing_slurm():
        if os.environ.get("ATLAS_REQUIRE_SLURM") == "1":
            pytest.fail(f"ATLAS_REQUIRE_SLURM=1 but {reason}")
        pytest.skip(reason)
    # Not under pytest's tmp_path: munged wants every folder above its socket searchable by all.
    root = Path(tempfile.mkdtemp(prefix="atlas-slurm-", dir="/tmp"))
    for sub, mode in (("munge", 0o700), ("run", 0o755), ("state", 0o755), ("spool", 0o755)):
        (root / sub).mkdir(mode=mode)
    root.chmod(0o755)
    host = socket.gethostname()
    (root / "slurm.conf").write_text(_slurm_conf(root, host))
    env = {**os.environ, "SLURM_CONF": str(root / "slurm.conf")}
    subprocess.run([_bin("mungekey"), "-c", "-k", str(root / "munge/munge.key")], check=True, capture_output=True)
    commands = [
        [_bin("munged"), "-F", f"--key-file={root}/munge/munge.key", f"--socket={root}/run/munge.sock"]
        + [f"--log-file={root}/munge/munged.log", f"--pid-file={root}/run/munged.pid"]
        + [f"--seed-file={root}/munge/munged.seed"],
        [_bin("slurmctld"), "-D", "-f", str(root / "slurm.conf")],
        # Jobs inherit slurmd's nice value: keep the test's work below everything else on the machine.
        [_bin("slurmd"), "-D", "-n", "19", "-f", str(root / "slurm.conf"), "-N", host],
    ]
    daemons: list[subprocess.Popen] = []
    try:
        for command in commands:
            with open(root / f"{Path(command[0]).name}.out", "wb") as out:
                daemons.append(
                    subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
                )
            time.sleep(1)
        deadline = time.monotonic() + 60
        while (state := _sinfo_state(env)) != "idle":
            dead = [Path(p.args[0]).name for p in daemons if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                logs = {f.name: f.read_text(errors="replace")[-800:] for f in root.glob("*.out")}
                pytest.fail(f"test cluster not idle (node state {state!r}, exited {dead}): {logs}")
            time.sleep(1)
        yield env
    finally:
        # Jobs run under slurmstepd, outside slurmd's process family: cancel them, then stop the daemons.
        subprocess.run([_bin("scancel"), "--user=root", "--full"], env=env, capture_output=True, check=False)
        deadline = time.monotonic() + 30
        while _queue(env) and time.monotonic() < deadline:
            time.sleep(1)
        for process in reversed(daemons):
            stop_family(process)
        shutil.rmtree(root, ignore_errors=True)


def _sinfo_state(env: dict[str, str]) -> str:
    result = subprocess.run(
        [_bin("sinfo"), "-h", "-o", "%T"], env=env, capture_output=True, text=True, timeout=30, check=False
    )
    return result.stdout.strip()


def _queue(env: dict[str, str]) -> str:
    result = subprocess.run([_bin("squeue"), "-h"], env=env, capture_output=True, text=True, timeout=30, check=False)
    return result.stdout.strip()


def _job(env: dict[str, str], job_id: str) -> dict[str, str]:
    result = subprocess.run(
        [_bin("scontrol"), "show", "job", "-o", job_id], env=env, capture_output=True, text=True, timeout=30, check=True
    )
    return dict(field.split("=", 1) for field in result.stdout.split() if "=" in field)


def test_submit_sim_runs_a_job_to_completion_and_writes_its_results(
    slurm_env: dict[str, str], tmp_path: Path, glue_dir: str, tiny_models: dict[str, str]
) -> None:
    out = tmp_path / "slurm-out"
    env = {**slurm_env, "PATH": f"{Path(sys.executable).parent}:{slurm_env['PATH']}"}
    env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    overrides = [f"model={json.dumps(tiny_models['bert'])}", f"data-dir={json.dumps(glue_dir)}", "run-name=slurm-smoke"]
    submit = subprocess.run(
        [str(ROOT / "scripts/slurm/submit.sh"), "--cpus", "2", "--time", "00:15:00", "--output", str(out)]
        + ["configs/smoke.toml", *overrides],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert submit.returncode == 0, submit.stdout + submit.stderr
    job_id = re.search(r"submitted job (\d+)", submit.stdout).group(1)

    deadline = time.monotonic() + 600
    while (job := _job(slurm_env, job_id))["JobState"] in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING"):
        assert time.monotonic() < deadline, f"job {job_id} still {job['JobState']} after 600 s"
        time.sleep(2)
    log = (out / f"slurm-{job_id}.out").read_text(errors="replace")
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0", log[-3000:]
    assert "finished:completed" in log
    assert f"JobId={job_id} " in (Path(slurm_env["SLURM_CONF"]).parent / "jobcomp.txt").read_text()

    run_dir = out / job_id / "slurm-smoke"  # the per-job output folder
    rounds = json.loads((run_dir / "rounds.json").read_text())
    assert [r["round"] for r in rounds] == [1, 2]
    # The job's FLWR_HOME was on scratch, its own, and removed at the end.
    flwr_home = re.search(r"FLWR_HOME=(\S+),", log).group(1)
    assert flwr_home.endswith(f"atlas-flwr-{job_id}") and not Path(flwr_home).exists()


def test_submit_rejects_bad_input_before_queueing(slurm_env: dict[str, str]) -> None:
    env = {**slurm_env, "PATH": f"{Path(sys.executable).parent}:{slurm_env['PATH']}"}
    for args, message in (
        (["--mode", "batch", "configs/smoke.toml"], "--mode batch is invalid: expected sim or deploy"),
        (["--gpus", "two", "configs/smoke.toml"], "--gpus two is invalid"),
        (["configs/nope.toml"], "config file configs/nope.toml not found"),
        (["configs/smoke.toml", "lr"], "override lr is invalid: expected KEY=VALUE"),
    ):
        result = subprocess.run(
            [str(ROOT / "scripts/slurm/submit.sh"), *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)
    assert _queue(slurm_env) == ""
