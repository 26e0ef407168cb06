"""Checks that need more than the config's types: the model, the data and the output folder exist and fit."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

from atlas_flwr.common.checkpoint import checkpoint_to_resume
from atlas_flwr.common.config import Config
from atlas_flwr.common.errors import ConfigError, DataError
from atlas_flwr.data import load_split


def preflight(cfg: Config) -> None:
    """Fail early, in one line, on an unknown model, a missing data folder or split, keys that
    contradict each other or the model, an output folder that cannot be made, or a checkpoint that
    cannot be resumed. ``atlas-run --check`` and the ServerApp both call it, so a bad value is refused
    the same way wherever it comes in.

    Hub data is not probed here (that needs the network); it fails on first load instead.
    """
    if cfg.min_clients > cfg.num_clients:
        raise ConfigError("min-clients", cfg.min_clients, f"an integer <= the {cfg.num_clients} clients of this run")
    if cfg.split != "none" and cfg.lr_schedule != "constant":
        raise ConfigError("lr-schedule", cfg.lr_schedule, "constant with split learning (its halves keep AdamW state)")
    if cfg.split != "none" and cfg.precision != "fp32":
        raise ConfigError("precision", cfg.precision, "fp32 with split learning (activations travel in fp32)")
    if cfg.dp_noise > 0 and cfg.dp_clip <= 0:
        raise ConfigError("dp-noise", cfg.dp_noise, "0 unless dp-clip > 0 (the noise is scaled to the clip)")
    if cfg.dp_clip > 0 and (cfg.split != "none" or cfg.workload != "glue"):
        raise ConfigError("dp-clip", cfg.dp_clip, "0 with split learning and the EuroSAT workload (no DP on them)")
    _check_output_dir(cfg)
    checkpoint_to_resume(cfg.resume_from, cfg.to_dict())
    if cfg.workload == "eurosat":
        # The CNN workload needs neither the language model nor GLUE: a machine may hold only EuroSAT.
        npz = cfg.resolved_eurosat_data()
        if npz and not Path(npz).is_file():
            raise DataError(
                f"EuroSAT file {npz!r} not found: expected eurosat_rgb_jpeg.npz (see the data README) or '' for the hub"
            )
        if npz and Path(npz).stat().st_size and not zipfile.is_zipfile(npz):
            raise DataError(f"EuroSAT file {npz!r} is not a readable npz (truncated or not a zip archive)")
        return
    _check_model_fits(cfg)
    data_dir = cfg.resolved_data_dir()
    if data_dir:
        for task in cfg.tasks:
            for split in ("train", "validation"):
                rows = len(load_split(task, split, data_dir))
                if split == "train" and rows < cfg.clients_for(task):
                    raise ConfigError(
                        "clients-per-task", cfg.clients_per_task, f"at most the {rows} train rows of {task}"
                    )


def _check_output_dir(cfg: Config) -> None:
    """The output folder exists, or its nearest existing parent is a folder this process may write in."""
    path = cfg.resolved_output_dir()
    parent = path
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        what = "not a directory" if not parent.is_dir() else "not writable"
        raise ConfigError("output-dir", str(path), f"a directory that can be created ({str(parent)!r} is {what})")


def _check_model_fits(cfg: Config) -> None:
    """LoRA rank, split block and simulated memory tiers against the model's shape."""
    from atlas_flwr.common.devices import parse_size
    from atlas_flwr.server.shapes import model_shape, train_shape
    from strategies.memory import Calibration, predict_peak_bytes
    from strategies.pipeline import resolve_switches

    shape = model_shape(cfg)  # the view the server plans ranks with
    largest = min(min(i, o) for i, o in shape.lora_targets_per_layer)
    if cfg.lora_rank > largest:
        raise ConfigError("lora-rank", cfg.lora_rank, f"an integer in [1, {largest}] for {cfg.model}'s projections")
    if cfg.split not in ("none", "auto") and int(cfg.split) >= shape.num_layers:
        raise ConfigError(
            "split", cfg.split, f"none, auto, or a block index in 1..{shape.num_layers - 1} ({cfg.model})"
        )
    switches = resolve_switches(cfg.strategy, cfg.clustering, cfg.ranks, cfg.aggregation)
    shrinks = cfg.over_budget == "shrink" and cfg.split == "none" and not switches.pooled
    if switches.ranks == "uniform" and not shrinks:
        return
    # The smallest simulated tier must train at least the top layer at rank 1 (a SuperNode's own
    # `memory` is checked by the server when it plans). The cheaper of the two devices' constants:
    # a config is refused only when it fits neither.
    smallest = min(parse_size(t) for t in cfg.device_tiers.split(",")) * cfg.device_scale
    frozen = cfg.lora_rank if cfg.frozen_layers == "use" else 0
    top = [0] * (shape.num_layers - 1) + [1]
    step = train_shape(cfg)
    need = min(
        predict_peak_bytes(shape, step, top, calibration=Calibration.for_device(d), frozen_rank=frozen)["total"]
        for d in ("cpu", "cuda")
    )
    if smallest < need:
        raise ConfigError(
            "device-tiers",
            cfg.device_tiers,
            f"tiers x device-scale ({cfg.device_scale:g}) of at least {need / 1e6:.0f} MB: "
            f"the smallest ({smallest / 1e6:.0f} MB) cannot train one LoRA layer of {cfg.model}",
        )
