"""Checks that need more than the config's types: the model and the data exist."""

from __future__ import annotations

from atlas_flwr.config import Config
from atlas_flwr.data import load_split
from atlas_flwr.models.registry import resolve_model


def preflight(cfg: Config) -> None:
    """Fail early, in one line, on an unknown model or a missing data folder or split.

    Hub data is not probed here (that needs the network); it fails on first load instead.
    """
    resolve_model(cfg.model)
    data_dir = cfg.resolved_data_dir()
    if data_dir:
        for task in cfg.tasks:
            for split in ("train", "validation"):
                load_split(task, split, data_dir)
