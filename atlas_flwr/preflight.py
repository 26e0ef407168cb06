"""Checks that need more than the config's types: the model and the data exist."""

from __future__ import annotations

from pathlib import Path

from atlas_flwr.checkpoint import checkpoint_to_resume
from atlas_flwr.config import Config
from atlas_flwr.data import load_split
from atlas_flwr.errors import ConfigError, DataError
from atlas_flwr.models.registry import resolve_model


def preflight(cfg: Config) -> None:
    """Fail early, in one line, on an unknown model, a missing data folder or split, keys that
    contradict each other, or a checkpoint that cannot be resumed.

    Hub data is not probed here (that needs the network); it fails on first load instead.
    """
    if cfg.min_clients > cfg.num_clients:
        raise ConfigError("min-clients", cfg.min_clients, f"an integer <= the {cfg.num_clients} clients of this run")
    if cfg.split != "none" and cfg.lr_schedule != "constant":
        raise ConfigError("lr-schedule", cfg.lr_schedule, "constant with split learning (its halves keep AdamW state)")
    if cfg.split != "none" and cfg.precision != "fp32":
        raise ConfigError("precision", cfg.precision, "fp32 with split learning (activations travel in fp32)")
    checkpoint_to_resume(cfg.resume_from, cfg.to_dict())
    if cfg.workload == "eurosat":
        # The CNN workload needs neither the language model nor GLUE: a machine may hold only EuroSAT.
        npz = cfg.resolved_eurosat_data()
        if npz and not Path(npz).is_file():
            raise DataError(
                f"EuroSAT file {npz!r} not found: expected eurosat_rgb_jpeg.npz (see the data README) or '' for the hub"
            )
        return
    resolve_model(cfg.model)
    data_dir = cfg.resolved_data_dir()
    if data_dir:
        for task in cfg.tasks:
            for split in ("train", "validation"):
                load_split(task, split, data_dir)
