"""Launch helpers: a local simulation SuperLink we own, ``flwr run``, and the run's final status.

``flwr run`` starts a background SuperLink of its own when none answers, and never stops it.
We start one ourselves instead, in its own process group, so that it and everything it
spawns (the ServerApp, Ray and the ClientApp actors) can be stopped together.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, Self

import httpx
import psutil

from atlas_flwr.common.errors import AtlasError

PORT_ENV = "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def toml_value(value: Any) -> str:
    """A run-config value as ``flwr run --run-config`` parses it (TOML scalars)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value)
    if '"' in text:
        raise AtlasError(f"run-config value {text!r} contains a double quote, which flwr run cannot pass")
    return json.dumps(text)


def run_config_arg(values: Mapping[str, Any]) -> str:
    """``k1=v1 k2=v2`` for ``--run-config``."""
    return " ".join(f"{k}={toml_value(v)}" for k, v in values.items())


def flower_tool(name: str) -> str:
    """The path of a Flower console script (``flwr``, ``flower-superlink``).

    The one beside this interpreter comes first, so a venv's own Flower is used even when the venv is
    not activated; then ``PATH``, where ``pip install --user`` or ``--target`` puts scripts.
    """
    beside = Path(sys.executable).with_name(name)
    if beside.is_file():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise AtlasError(f"Flower's {name!r} command is neither beside {sys.executable} nor on PATH: install flwr")
    return found


class LocalSuperLink(AbstractContextManager):
    """A simulation SuperLink on a free port, stopped (with all its children) on exit.

    Parameters
    ----------
    workdir : Path, optional
        Where its database and log go (a temporary folder by default).
    port : int, optional
        The HTTP API port; a free one by default.
    """

    def __init__(self, workdir: Path | None = None, port: int | None = None) -> None:
        # A folder it made is its own: removed on stop, so no run leaves its state behind in the temp dir.
        self._owns_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="atlas-superlink-"))
        self.port = port or free_port()
        self.process: subprocess.Popen | None = None
        # Every process it has spawned so far: if it dies, its children are re-parented and can no longer
        # be found from it, so they are recorded while it lives (a watcher thread, every 0.5 s).
        self._family: dict[int, psutil.Process] = {}
        self._watching = threading.Event()
        self._watcher: threading.Thread | None = None

    @property
    def env(self) -> dict[str, str]:
        """Environment for ``flwr`` commands that talk to this SuperLink."""
        env = dict(os.environ)
        env[PORT_ENV] = str(self.port)
        env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
        env.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
        return env

    def _healthy(self) -> bool:
        try:
            return httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=0.5).is_success
        except httpx.HTTPError:
            return False

    #: Where the SuperLink's output goes, under ``workdir``.
    log_name = "superlink.out"

    def _command(self) -> list[str]:
        return [
            flower_tool("flower-superlink"),
            *("--insecure", "--simulation", "--isolation", "subprocess"),
            *("--host", "127.0.0.1", "--port", str(self.port)),
            *("--database", str(self.workdir / "state.db"), "--disable-runtime-dependency-installation"),
        ]

    def __enter__(self) -> Self:
        self.workdir.mkdir(parents=True, exist_ok=True)
        with open(self.workdir / self.log_name, "wb") as out:
            self.process = subprocess.Popen(
                self._command(), env=self.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        self._watching.set()
        self._watcher = threading.Thread(target=self._watch, name="superlink-family", daemon=True)
        self._watcher.start()
        deadline = time.monotonic() + 60
        while not self._healthy():
            if self.process.poll() is not None or time.monotonic() > deadline:
                tail = (self.workdir / self.log_name).read_text(errors="replace")[-2000:]
                self.stop()
                raise AtlasError(f"the SuperLink did not start on port {self.port}: {tail.strip()[-300:]}")
            time.sleep(0.2)
        return self

    def _track(self) -> None:
        if self.process is None:
            return
        with contextlib.suppress(psutil.NoSuchProcess):
            for child in psutil.Process(self.process.pid).children(recursive=True):
                self._family.setdefault(child.pid, child)

    def _watch(self) -> None:
        while self._watching.is_set() and self.process is not None and self.process.poll() is None:
            self._track()
            time.sleep(0.5)

    def alive(self) -> bool:
        """Whether the SuperLink process is still running."""
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        """Stop the SuperLink and every process it spawned (see :func:`stop_family`), also those it left
        behind when it died (recorded while it lived)."""
        self._watching.clear()
        if self._watcher is not None:
            self._watcher.join(timeout=5)
        if self.process is not None:
            self._track()
            stop_family(self.process, extra=list(self._family.values()))
        self.process = None
        if self._owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def flwr(self, *args: str, capture: bool = True, timeout: float | None = None) -> subprocess.CompletedProcess:
        """Run a ``flwr`` CLI command against this SuperLink.

        Refused once the SuperLink has died: ``flwr`` would start a SuperLink of its own, which nobody stops.
        """
        if self.process is not None and not self.alive():
            raise AtlasError(
                f"the SuperLink (pid {self.process.pid}) exited with code {self.process.returncode} "
                f"during the run; its log: {self.workdir / self.log_name}"
            )
        command = [flower_tool("flwr"), *args]
        return subprocess.run(command, env=self.env, capture_output=capture, text=True, timeout=timeout, check=False)


def stop_family(process: subprocess.Popen, extra: Sequence[psutil.Process] = ()) -> None:
    """Stop a process we started and every process it spawned: SIGTERM, then SIGKILL after 10 s.

    Flower's runtimes (SuperExec, the simulation) start in sessions of their own, so the
    process's group alone does not hold them: the descendants are listed before anything is
    killed, and each of their process groups is signalled too. ``extra`` adds processes recorded
    earlier (descendants that outlived their parent are no longer found from it).
    """
    try:
        family = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        family = []
    known = {p.pid for p in family}
    for p in extra:
        with contextlib.suppress(psutil.NoSuchProcess):
            if p.pid not in known and p.is_running():  # is_running also checks the start time (no reused pid)
                family.append(p)
                family.extend(c for c in p.children(recursive=True) if c.pid not in known)
                known |= {c.pid for c in family}
    groups = {process.pid} | ({_pgid(p) for p in family} - {None, os.getpgid(0)})
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        for group in groups:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(group, sig)
        _, alive = psutil.wait_procs(family, timeout=wait)
        if not alive:
            break
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=5)


def _pgid(process: psutil.Process) -> int | None:
    try:
        return os.getpgid(process.pid)
    except (ProcessLookupError, psutil.NoSuchProcess):
        return None


def stream_flwr_run(
    link: LocalSuperLink,
    app: Path,
    run_config: Mapping[str, Any],
    federation_config: Mapping[str, Any] | None = None,
    connection: str | None = None,
) -> int:
    """``flwr run <app> [connection] --stream``; echo its output and return the run id it started.

    ``link`` is anything with ``env`` (e.g. :class:`LocalSuperLink`, ``deploy.TLSSuperLink``);
    ``connection`` names a SuperLink connection of the ``FLWR_HOME`` config (the default one if None).
    """
    args = ["run", str(app), *([connection] if connection else []), "--stream"]
    args += ["--run-config", run_config_arg(run_config)]
    if federation_config:
        args += ["--federation-config", " ".join(f"{k}={toml_value(v)}" for k, v in federation_config.items())]
    command = [flower_tool("flwr"), *args]
    run_id = None
    with subprocess.Popen(
        command, env=link.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    ) as proc:
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                sys.stdout.write(line)
                sys.stdout.flush()
                if run_id is None and (match := re.search(r"started run (\d+)", line)):
                    run_id = int(match.group(1))
        except BaseException:
            # Interrupted (Ctrl-C, SIGTERM): `flwr run --stream` streams until the run ends and
            # leaving this block waits for it, so stop it first; then the SuperLink is stopped.
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
        proc.wait()
    if run_id is None:
        raise AtlasError(f"flwr run did not start a run (exit code {proc.returncode}); see its output above")
    return run_id


def run_status(link: LocalSuperLink, run_id: int, connection: str | None = None) -> dict[str, Any]:
    """The run's entry from ``flwr list [connection] --run-id ID --format json`` (status, details, times)."""
    where = [connection] if connection else []
    result = link.flwr("list", *where, "--run-id", str(run_id), "--format", "json", timeout=60)
    try:
        payload = json.loads(result.stdout)
    except json.JSONDecodeError as err:
        raise AtlasError(f"flwr list gave no JSON for run {run_id}: {result.stdout[-300:]!r}") from err
    runs: Sequence[dict[str, Any]] = payload.get("runs", [])
    for run in runs:
        if int(run["run-id"]) == run_id:
            return dict(run)
    raise AtlasError(f"run {run_id} not found by flwr list")
