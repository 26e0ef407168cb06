"""What a node is: its memory budget and rank cap, and (in tests) whether it fails on purpose."""

from __future__ import annotations

import numpy as np
from flwr.app import Context

from atlas_flwr.client.train import seed_for
from atlas_flwr.common.config import Config
from atlas_flwr.common.devices import DeviceProfile, parse_size, profile_for
from atlas_flwr.common.errors import AtlasError


def device_profile(context: Context, cfg: Config, client_id: int) -> DeviceProfile:
    """The client's memory budget and rank cap: ``memory`` (e.g. ``"4GB"``) and ``max-rank`` in its node
    config on the Deployment Engine, else the simulated tiers of its partition id (``device-tiers`` x
    ``device-scale``, ``rank-tiers``)."""
    if "memory" in context.node_config:
        raw = str(context.node_config["memory"])
        raw_rank = str(context.node_config.get("max-rank", 0))
        if not raw_rank.isdigit():
            raise AtlasError(f"node_config max-rank = {raw_rank!r} is invalid: expected an integer >= 0 (0: no cap)")
        try:
            return DeviceProfile(f"node-{raw}", parse_size(raw), int(raw_rank))
        except ValueError as err:
            raise AtlasError(f"node_config memory = {raw!r}: {err}") from err
    return profile_for(client_id, cfg.device_tiers.split(","), cfg.device_scale, cfg.rank_caps)


def injected_failure(seed: int, client_id: int, server_round: int, rate: float) -> bool:
    """Whether this client fails this round on purpose (test config ``inject-failures``), reproducibly."""
    return bool(np.random.default_rng(seed_for(seed, client_id, server_round, 0xFA11)).random() < rate)
