"""``atlas-deploy``: run the app on Flower's Deployment Engine, with TLS and SuperNode authentication.

Three commands share one folder (``--workdir``) and one code path:

* ``local``: a SuperLink and N SuperNodes on this machine, the run, its status, then stop them all;
* ``superlink``: the SuperLink half, for a cluster job: it writes ``federation.json`` when
  SuperNodes may connect, runs the app once N are online, then writes ``done``;
* ``supernode --index I``: the SuperNode half, for a job array task: it waits for
  ``federation.json`` (the folder must be shared), connects, and stops when ``done`` appears.

TLS (flwr 1.42): the SuperLink serves its Fleet, Control and Runtime APIs over HTTPS on one
port (``--ssl-certfile``/``--ssl-keyfile``/``--ssl-ca-certfile``); SuperNodes and the ``flwr``
CLI verify it against our CA. Authentication: ``--enable-supernode-auth`` makes the SuperLink
accept only SuperNodes whose public key (ECDSA P-384, OpenSSH format) was registered with
``flwr supernode register``; each SuperNode signs its requests with ``--auth-supernode-private-key``.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Self

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from atlas_flwr.common.config import Config
from atlas_flwr.common.errors import AtlasError
from atlas_flwr.server.preflight import preflight
from atlas_tools.cli import resolve_run_config
from atlas_tools.launch import (
    LocalSuperLink,
    flower_tool,
    free_port,
    run_status,
    stop_family,
    stream_flwr_run,
    toml_value,
)

CONNECTION = "atlas-deploy"  # the SuperLink connection's name in the per-run FLWR_HOME
FEDERATION_FILE = "federation.json"
DONE_FILE = "done"


def _write_private(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def write_certificates(directory: Path, hosts: Sequence[str]) -> dict[str, Path]:
    """A CA and a server certificate signed by it, valid for ``hosts`` (names or IPs) and loopback.

    Returns
    -------
    dict
        ``ca``, ``cert`` and ``key``: paths of the PEM files.
    """
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ATLAS-FL deployment CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )  # key_cert_sign, crl_sign
        .add_extension(ca_ski, critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(["localhost", "127.0.0.1", *hosts]):
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "atlas-superlink")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    paths = {"ca": directory / "ca.crt", "cert": directory / "server.crt", "key": directory / "server.key"}
    directory.mkdir(parents=True, exist_ok=True)
    paths["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_private(paths["key"], _pem_key(key))
    return paths


def write_node_key(directory: Path, index: int) -> tuple[Path, Path]:
    """An ECDSA P-384 key pair in OpenSSH format, the form ``flower-supernode`` and ``flwr supernode register`` read."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = directory / f"node-{index}.key"
    public = directory / f"node-{index}.pub"
    _write_private(
        private,
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        ),
    )
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )
    return private, public


def node_config(index: int, num_nodes: int, memory: Sequence[str]) -> str:
    """``--node-config`` of SuperNode ``index``: its partition, the population, and its memory (cycled)."""
    values: dict[str, Any] = {"partition-id": index, "num-partitions": num_nodes}
    if memory:
        values["memory"] = memory[index % len(memory)]
    return " ".join(f"{k}={toml_value(v)}" for k, v in values.items())


class TLSSuperLink(LocalSuperLink):
    """A SuperLink with TLS and SuperNode authentication, and a ``flwr`` CLI home that trusts it.

    Starting, waiting for health and stopping (by PID, with every child) are :class:`LocalSuperLink`'s.

    Parameters
    ----------
    workdir : Path
        Its certificates, database, log and ``FLWR_HOME`` go here.
    host : str
        Bind address (``0.0.0.0`` to accept SuperNodes of other machines).
    port : int
        The HTTPS port of its Fleet, Control and Runtime APIs.
    advertise : str
        The host name SuperNodes and the CLI use; the certificate is valid for it.
    """

    log_name = "superlink.log"

    def __init__(self, workdir: Path, host: str = "127.0.0.1", port: int = 0, advertise: str = "127.0.0.1") -> None:
        super().__init__(workdir.resolve(), port or None)
        self.host, self.advertise = host, advertise
        self.tls: dict[str, Path] = {}
        self._context: ssl.SSLContext | None = None

    @property
    def address(self) -> str:
        """``host:port`` as SuperNodes and the CLI reach it."""
        return f"{self.advertise}:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """Environment for this SuperLink and for ``flwr`` commands that talk to it."""
        env = dict(os.environ)
        env["FLWR_HOME"] = str(self.workdir / "flwr-home")
        env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
        return env

    def _healthy(self) -> bool:
        try:
            url = f"https://{self.advertise}:{self.port}/health"
            return httpx.get(url, verify=self._context, timeout=1).is_success
        except httpx.HTTPError:
            return False

    def _command(self) -> list[str]:
        return [
            flower_tool("flower-superlink"),
            *("--ssl-ca-certfile", str(self.tls["ca"]), "--ssl-certfile", str(self.tls["cert"])),
            *("--ssl-keyfile", str(self.tls["key"]), "--enable-supernode-auth"),
            *("--isolation", "subprocess", "--host", self.host, "--port", str(self.port)),
            *("--database", str(self.workdir / "state.db"), "--disable-runtime-dependency-installation"),
        ]

    def __enter__(self) -> Self:
        hosts = [self.advertise, socket.gethostname(), socket.getfqdn()]
        self.tls = write_certificates(self.workdir / "tls", hosts)
        self._context = ssl.create_default_context(cafile=str(self.tls["ca"]))
        home = self.workdir / "flwr-home"
        home.mkdir(parents=True, exist_ok=True)
        # A connection of our own in a FLWR_HOME of our own: no [tool.flwr.federations] in pyproject,
        # and the user's ~/.flwr is left alone.
        (home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "{self.address}"\nroot-certificates = "{self.tls["ca"]}"\n'
        )
        return super().__enter__()

    def register(self, public_key: Path) -> int:
        """Register a SuperNode's public key; return its node id."""
        result = self.flwr("supernode", "register", str(public_key), CONNECTION, "--format", "json", timeout=60)
        try:
            return int(json.loads(result.stdout)["node-id"])
        except (json.JSONDecodeError, KeyError) as err:
            raise AtlasError(f"flwr supernode register {public_key} failed: {result.stdout[-300:]}") from err

    def online(self) -> int:
        """How many registered SuperNodes are connected now."""
        result = self.flwr("supernode", "list", CONNECTION, "--format", "json", timeout=60)
        try:
            nodes = json.loads(result.stdout)["nodes"]
        except (json.JSONDecodeError, KeyError):
            return 0
        return sum(node.get("status") == "online" for node in nodes)


def _tail(path: Path, chars: int = 600) -> str:
    try:
        return path.read_text(errors="replace")[-chars:].strip()
    except OSError:
        return "(no log)"


def supernode_command(workdir: Path, index: int) -> list[str]:
    """``flower-supernode`` for node ``index`` of the federation described in ``workdir``."""
    fed = json.loads((workdir / FEDERATION_FILE).read_text())
    if not 0 <= index < fed["num-supernodes"]:
        raise AtlasError(f"--index {index} is invalid: expected 0..{fed['num-supernodes'] - 1}")
    return [
        flower_tool("flower-supernode"),
        *("--superlink", fed["address"], "--root-certificates", fed["ca"]),
        *("--auth-supernode-private-key", str(workdir / "keys" / f"node-{index}.key")),
        *("--node-config", fed["node-configs"][index]),
        # Each SuperNode's own Runtime API (for its ClientApp process) on a free loopback port.
        *("--host", "127.0.0.1", "--port", str(free_port())),
    ]


def start_supernode(workdir: Path, index: int) -> subprocess.Popen:
    """Start SuperNode ``index`` in its own session, logging to ``supernode-<index>.log``."""
    env = {**os.environ, "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    env["FLWR_HOME"] = str(workdir / f"supernode-{index}-home")  # its installed FABs, apart from the others'
    with open(workdir / f"supernode-{index}.log", "wb") as out:
        return subprocess.Popen(
            supernode_command(workdir, index), env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def serve(
    link: TLSSuperLink,
    app: Path,
    values: dict[str, Any],
    memory: Sequence[str],
    local_nodes: bool,
    wait_s: float,
) -> dict[str, Any]:
    """Register N SuperNodes, publish the federation, wait for them, run the app; return the run's status."""
    workdir, num = link.workdir, Config.from_run_config(values).num_clients
    fed = {"address": link.address, "ca": str(link.tls["ca"]), "num-supernodes": num}
    fed["node-configs"] = [node_config(i, num, memory) for i in range(num)]
    for i in range(num):
        link.register(write_node_key(workdir / "keys", i)[1])
    # Written last and atomically: SuperNode jobs poll for this file.
    (workdir / f"{FEDERATION_FILE}.tmp").write_text(json.dumps(fed, indent=1))
    (workdir / f"{FEDERATION_FILE}.tmp").replace(workdir / FEDERATION_FILE)
    print(f"atlas-deploy: SuperLink pid {link.process.pid} at {link.address}; logs in {workdir}", flush=True)
    with ExitStack() as stack:
        nodes = []
        for i in range(num if local_nodes else 0):
            nodes.append(start_supernode(workdir, i))
            stack.callback(stop_family, nodes[-1])
            print(f"atlas-deploy: SuperNode {i} pid {nodes[-1].pid}: {fed['node-configs'][i]}", flush=True)
        deadline = time.monotonic() + wait_s
        # The ServerApp asks every node at once who it is: start only when all are connected.
        while (online := link.online()) < num:
            if dead := [i for i, node in enumerate(nodes) if node.poll() is not None]:
                raise AtlasError(f"SuperNode {dead[0]} exited: {_tail(workdir / f'supernode-{dead[0]}.log', 300)}")
            if time.monotonic() > deadline:
                logs = " | ".join(f"node {i}: {_tail(workdir / f'supernode-{i}.log', 200)}" for i in range(num))
                raise AtlasError(f"only {online} of {num} SuperNodes connected within {wait_s:.0f} s; {logs}")
            time.sleep(1)
        run_id = stream_flwr_run(link, app, values, connection=CONNECTION)
        return run_status(link, run_id, connection=CONNECTION)


def wait_for_file(path: Path, timeout: float) -> None:
    """Poll for ``path`` (a file another job writes on a shared file system)."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise AtlasError(f"{path} did not appear within {timeout:.0f} s: is the SuperLink job running?")
        time.sleep(2)


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(prog="atlas-deploy", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("local", "superlink"):
        cmd = sub.add_parser(name, help=f"{name}: see the module docstring")
        cmd.add_argument("config", nargs="?", type=Path, help="a run-config TOML file (e.g. configs/smoke.toml)")
        cmd.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
        cmd.add_argument("--app", type=Path, default=Path.cwd(), help="project directory (default: cwd)")
        cmd.add_argument("--workdir", type=Path, required=name == "superlink", help="certificates, keys, logs")
        cmd.add_argument("--port", type=int, default=0, help="SuperLink HTTPS port (default: a free one)")
        cmd.add_argument("--memory", default="", help="SuperNode memory budgets, cycled: e.g. 2GB,4GB")
        cmd.add_argument("--wait", type=float, default=600, help="seconds to wait for the SuperNodes")
        if name == "superlink":
            cmd.add_argument("--host", default="0.0.0.0", help="bind address")
            cmd.add_argument("--advertise", default=socket.gethostname(), help="host name SuperNodes connect to")
    node = sub.add_parser("supernode", help="one SuperNode of a federation a `superlink` command publishes")
    node.add_argument("--workdir", type=Path, required=True, help="the superlink command's (shared) workdir")
    node.add_argument("--index", type=int, required=True, help="its partition id, e.g. $SLURM_ARRAY_TASK_ID")
    node.add_argument("--wait", type=float, default=1800, help="seconds to wait for the SuperLink")
    return parser


def _run_supernode(workdir: Path, index: int, wait_s: float) -> int:
    wait_for_file(workdir / FEDERATION_FILE, wait_s)
    process = start_supernode(workdir, index)
    print(f"atlas-deploy: SuperNode {index} pid {process.pid}", flush=True)
    try:
        while not (workdir / DONE_FILE).exists():
            if process.poll() is not None:
                raise AtlasError(
                    f"SuperNode {index} exited ({process.returncode}): {_tail(workdir / f'supernode-{index}.log')}"
                )
            time.sleep(2)
    finally:
        stop_family(process)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``atlas-deploy``; returns the process exit code."""
    args = build_parser().parse_args(argv)
    # SIGTERM (scancel, the end of a job) unwinds like Ctrl-C, so every process we started is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        if args.command == "supernode":
            return _run_supernode(args.workdir.resolve(), args.index, args.wait)
        app = args.app.resolve()
        values = resolve_run_config(app, args.config, args.overrides)
        preflight(Config.from_run_config(values))
        memory = [m.strip() for m in args.memory.split(",") if m.strip()]
        workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="atlas-deploy-"))).resolve()
        if workdir.exists() and (workdir / FEDERATION_FILE).exists():
            raise AtlasError(f"--workdir {str(workdir)!r} holds an earlier federation: expected a new or empty folder")
        workdir.mkdir(parents=True, exist_ok=True)
        local = args.command == "local"
        host, advertise = ("127.0.0.1", "127.0.0.1") if local else (args.host, args.advertise)
        try:
            with TLSSuperLink(workdir, host, args.port, advertise) as link:
                status = serve(link, app, values, memory, local_nodes=local, wait_s=args.wait)
        finally:
            (workdir / DONE_FILE).touch()  # SuperNode jobs stop when they see it, whatever happened here
    except AtlasError as err:
        print(f"atlas-deploy: {err}", file=sys.stderr)
        return 2
    run_dir = Path(values["output-dir"]) / values["run-name"]
    if status.get("status") != "finished:completed":
        print(f"atlas-deploy: run ended {status.get('status')}: {status.get('status-details')}", file=sys.stderr)
        return 1
    print(f"atlas-deploy: run {status.get('run-id')} finished:completed; results in {run_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
