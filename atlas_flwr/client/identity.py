"""Who a ClientApp is: the run config and the client id, for every workload."""

from __future__ import annotations

from dataclasses import replace

from flwr.app import Context

from atlas_flwr.common.config import Config
from atlas_flwr.common.errors import AtlasError


def client_identity(context: Context) -> tuple[Config, int]:
    """The run config and this client's id (``partition-id`` of its node config).

    In simulation the engine sets ``partition-id`` and ``num-partitions``; on the
    Deployment Engine the SuperNode's ``--node-config`` does, and may also give the site's own
    ``data-dir`` or ``eurosat-data``. One code path for both, and for
    both workloads (the population is ``tasks x clients-per-task`` or ``eurosat-clients``).
    """
    cfg = Config.from_run_config(context.run_config)
    node = context.node_config
    if "partition-id" not in node:
        raise AtlasError(
            "node_config lacks 'partition-id': start the SuperNode with --node-config 'partition-id=N ...'"
        )
    client_id = int(node["partition-id"])
    num_partitions = int(node.get("num-partitions", cfg.num_clients))
    population = "eurosat-clients" if cfg.workload == "eurosat" else "tasks x clients-per-task"
    if num_partitions != cfg.num_clients:
        raise AtlasError(
            f"num-partitions = {num_partitions} but {population} = {cfg.num_clients}: "
            "run with as many SuperNodes as clients"
        )
    if not 0 <= client_id < cfg.num_clients:
        raise AtlasError(f"partition-id = {client_id} is invalid: expected 0..{cfg.num_clients - 1} ({population})")
    # A site's data lives where the site keeps it: a path in the node config beats the run config's.
    paths = {key.replace("-", "_"): str(node[key]) for key in ("data-dir", "eurosat-data") if key in node}
    return (replace(cfg, **paths) if paths else cfg), client_id
