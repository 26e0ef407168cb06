"""The Deployment Engine for real, on loopback: a SuperLink with TLS and SuperNode authentication,
two SuperNodes with their own node config, ``flwr run``, the run's status, then nothing left running."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from atlas_tools.deploy import TLSSuperLink, write_node_key
from atlas_tools.launch import free_port, stop_family
from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_deploy_local_runs_two_authenticated_supernodes_to_completion(
    tmp_path: Path, glue_dir: str, tiny_models: dict[str, str]
) -> None:
    out, workdir = tmp_path / "outputs", tmp_path / "deploy"
    command = [str(Path(sys.executable).with_name("atlas-deploy")), "local", "configs/smoke.toml"]
    command += ["--app", str(ROOT), "--workdir", str(workdir), "--memory", "2GB,4GB", "--wait", "120"]
    # FedAvg: every message starts a fresh ClientApp process on the Deployment Engine, and ATLAS's extra
    # fingerprint query costs one more per client; ATLAS planning is covered by the in-process tests.
    # One round: every round costs four more ClientApp processes, and one shows TLS, authentication and node config.
    sets = (f"model={json.dumps(tiny_models['bert'])}", f"data-dir={json.dumps(glue_dir)}", 'strategy="fedavg"')
    sets += ("num-server-rounds=1",)
    for kv in sets:
        command += ["--set", kv]
    command += ["--set", f"output-dir={json.dumps(str(out))}", "--set", "run-name=deployed"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "FLWR_HOME": str(tmp_path / "home")}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "finished:completed" in result.stdout

    # Authentication was on (flower-superlink warns when it is off), and each SuperNode had its own node config.
    assert "SuperNode authentication is disabled" not in (workdir / "superlink.log").read_text()
    assert 'partition-id=0 num-partitions=2 memory="2GB"' in result.stdout
    assert 'partition-id=1 num-partitions=2 memory="4GB"' in result.stdout

    run_dir = out / "deployed"
    rounds = json.loads((run_dir / "rounds.json").read_text())
    assert [r["round"] for r in rounds] == [1] and rounds[-1]["bytes-received"] > 0
    # The server planned with the memory of each node's config: the ClientApp read it from node_config.
    ranks = json.loads((run_dir / "ranks.json").read_text())
    assert [(r["client-id"], r["memory-budget-bytes"]) for r in ranks] == [(0, 2_000_000_000), (1, 4_000_000_000)]

    pids = [int(p) for p in re.findall(r"pid (\d+)", result.stdout)]
    assert len(pids) == 3, result.stdout[-2000:]  # the SuperLink and two SuperNodes
    assert not [p for p in pids if _alive(p)]
    leftovers = [p.pid for p in psutil.process_iter(["cmdline"]) if str(workdir) in " ".join(p.info["cmdline"] or [])]
    assert not leftovers


def test_the_superlink_refuses_plaintext_and_unregistered_supernodes(tmp_path: Path) -> None:
    with TLSSuperLink(tmp_path / "link") as link:
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://{link.address}/health", timeout=5)  # no TLS, no answer

        key, public = write_node_key(tmp_path / "keys", 0)
        command = [str(Path(sys.executable).with_name("flower-supernode")), "--superlink", link.address]
        command += ["--root-certificates", str(link.tls["ca"]), "--auth-supernode-private-key", str(key)]
        command += ["--node-config", "partition-id=0 num-partitions=1", "--port", str(free_port())]
        log = tmp_path / "refused.log"
        with open(log, "wb") as out:
            node = subprocess.Popen(command, env=link.env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            # flower-supernode logs exit code 305 but then lingers (its HTTP thread): watch the log, not the exit.
            deadline = time.monotonic() + 60
            while "Failed to activate SuperNode" not in log.read_text(errors="replace"):
                assert time.monotonic() < deadline, log.read_text(errors="replace")[-2000:]
                time.sleep(0.5)
        finally:
            stop_family(node)
        assert link.online() == 0

        # The same SuperNode, once its public key is registered, is let in: the refusal was the authentication.
        link.register(public)
        node = subprocess.Popen(command, env=link.env, stdout=subprocess.DEVNULL, start_new_session=True)
        try:
            deadline = time.monotonic() + 60
            while link.online() < 1:
                assert node.poll() is None and time.monotonic() < deadline, "the registered SuperNode did not connect"
                time.sleep(0.5)
        finally:
            stop_family(node)
        superlink = link.process
    assert superlink is not None and not _alive(superlink.pid) and not _alive(node.pid)


def test_node_config_data_paths_override_the_run_config(run_config: dict) -> None:
    from flwr.app import Context, RecordDict

    from atlas_flwr.client.identity import client_identity

    node = {"partition-id": 1, "num-partitions": 8, "data-dir": "/data/site-b/glue", "eurosat-data": "/data/b.npz"}
    context = Context(run_id=1, node_id=7, node_config=node, state=RecordDict(), run_config=run_config)
    cfg, client_id = client_identity(context)
    assert client_id == 1 and cfg.data_dir == "/data/site-b/glue" and cfg.eurosat_data == "/data/b.npz"
