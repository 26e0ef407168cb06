"""Server checkpoints after every round: tensors as safetensors, everything else as JSON, written atomically.

A checkpoint is ``<run dir>/checkpoint/``:

- ``round-NNNN.safetensors``: every client's adapter and head (``adapter/<client>/<key>``,
  ``head/<client>/<key>``), the server's RNG states (``rng/numpy``, ``rng/torch``) and any other
  server tensors (``extra/...``: the EuroSAT global model);
- ``state.json``: the round, the run config, groups, adjacency, rank plan, the metrics so far, and the
  name and SHA-256 of the tensor file it belongs to.

The tensor file is written first (temporary name, then rename); ``state.json`` is renamed into place
last, so it is the commit point: a crash at any moment leaves the previous complete checkpoint. Older
tensor files are removed only after the new ``state.json`` is in place.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from atlas_flwr.common.errors import AtlasError
from atlas_flwr.common.results import atomic_write
from atlas_flwr.common.state import State

CHECKPOINT_DIR = "checkpoint"
STATE_FILE = "state.json"
FORMAT = 1
#: Keys that may differ between the checkpointed run and the resumed one.
RESUMABLE_CHANGES = frozenset({"num-server-rounds", "time-limit-minutes", "resume-from", "output-dir", "run-name"})


@dataclass
class Checkpoint:
    """A loaded checkpoint: the round it ends, per-client states, RNG states and the JSON metadata."""

    run_dir: Path
    server_round: int
    adapters: dict[int, State]
    heads: dict[int, State]
    meta: dict[str, Any]
    rng: dict[str, np.ndarray]
    extra: dict[str, np.ndarray]

    def restore_rng(self) -> None:
        """Put the server's numpy and torch global RNGs back where they were after the round."""
        if "numpy" in self.rng:
            kind, pos, has_gauss, cached = self.meta["rng-numpy"]
            np.random.set_state((kind, self.rng["numpy"].astype(np.uint32), pos, has_gauss, cached))
        if "torch" in self.rng:
            torch.set_rng_state(torch.from_numpy(self.rng["torch"].astype(np.uint8)))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(
    run_dir: Path,
    server_round: int,
    adapters: Mapping[int, State],
    heads: Mapping[int, State],
    meta: Mapping[str, Any],
    extra: Mapping[str, np.ndarray] | None = None,
) -> Path:
    """Write the checkpoint of ``server_round``; return the path of its ``state.json``.

    ``extra`` holds any other server tensors, stored as ``extra/<key>``.
    """
    folder = run_dir / CHECKPOINT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, np.ndarray] = {}
    for prefix, states in (("adapter", adapters), ("head", heads)):
        for client_id, state in states.items():
            for key, value in state.items():
                tensors[f"{prefix}/{client_id}/{key}"] = np.ascontiguousarray(value)
    tensors |= {f"extra/{k}": np.ascontiguousarray(v) for k, v in (extra or {}).items()}
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["rng/numpy"] = np.asarray(keys, dtype=np.uint32)
    tensors["rng/torch"] = torch.get_rng_state().numpy().copy()
    name = f"round-{server_round:04d}.safetensors"
    tmp = folder / f".{name}.tmp"
    save_file(tensors, str(tmp), metadata={"format": str(FORMAT), "round": str(server_round)})
    os.replace(tmp, folder / name)
    state = {
        "format": FORMAT,
        "round": server_round,
        "tensors": name,
        "sha256": _sha256(folder / name),
        "rng-numpy": [kind, int(pos), int(has_gauss), float(cached)],
        **meta,
    }
    atomic_write(folder / STATE_FILE, json.dumps(state, indent=1) + "\n")
    for old in folder.glob("round-*.safetensors"):
        if old.name != name:
            old.unlink()
    return folder / STATE_FILE


def _state_path(path: Path) -> Path:
    if path.is_file():
        return path
    for candidate in (path / CHECKPOINT_DIR / STATE_FILE, path / STATE_FILE):
        if candidate.is_file():
            return candidate
    raise AtlasError(f"resume-from {str(path)!r} holds no checkpoint: expected a run directory with {CHECKPOINT_DIR}/")


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Load a checkpoint from a run directory, its ``checkpoint/`` folder or its ``state.json``.

    A missing file, a tensor file whose digest differs from the recorded one, or an unknown format
    gives a one-line :class:`AtlasError`.
    """
    state_path = _state_path(Path(path))
    try:
        meta = json.loads(state_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise AtlasError(f"checkpoint {str(state_path)!r} is unreadable: {err}") from err
    if meta.get("format") != FORMAT:
        raise AtlasError(f"checkpoint {str(state_path)!r} has format {meta.get('format')!r}: expected {FORMAT}")
    tensor_path = state_path.parent / meta["tensors"]
    if not tensor_path.is_file():
        raise AtlasError(f"checkpoint tensors {str(tensor_path)!r} are missing")
    if _sha256(tensor_path) != meta["sha256"]:
        raise AtlasError(f"checkpoint tensors {str(tensor_path)!r} do not match the digest in {STATE_FILE}")
    adapters: dict[int, State] = {}
    heads: dict[int, State] = {}
    rng: dict[str, np.ndarray] = {}
    extra: dict[str, np.ndarray] = {}
    for name, value in sorted(load_file(str(tensor_path)).items()):
        prefix, rest = name.split("/", 1)
        if prefix in ("rng", "extra"):
            (rng if prefix == "rng" else extra)[rest] = value
            continue
        client, key = rest.split("/", 1)
        (adapters if prefix == "adapter" else heads).setdefault(int(client), {})[key] = value
    return Checkpoint(state_path.parent.parent, int(meta["round"]), adapters, heads, meta, rng, extra)


def check_resumable(saved: Mapping[str, Any], current: Mapping[str, Any]) -> None:
    """Refuse to resume with a run config that changes anything but the keys in :data:`RESUMABLE_CHANGES`."""
    for key in sorted(set(saved) | set(current)):
        if key in RESUMABLE_CHANGES:
            continue
        if saved.get(key) != current.get(key):
            raise AtlasError(
                f"resume-from: run-config key {key!r} = {current.get(key)!r} differs from the checkpoint's "
                f"{saved.get(key)!r}; only {', '.join(sorted(RESUMABLE_CHANGES))} may change"
            )


def checkpoint_to_resume(resume_from: str, run_config: Mapping[str, Any]) -> Checkpoint | None:
    """The checkpoint ``resume-from`` names, checked against the run config; None when it is empty.

    Refused in one line: a changed run config (see :func:`check_resumable`), or a checkpoint that
    already ends the run's last round.
    """
    if not resume_from:
        return None
    ckpt = load_checkpoint(resume_from)
    check_resumable(ckpt.meta["run-config"], run_config)
    rounds = run_config["num-server-rounds"]
    if ckpt.server_round >= rounds:
        raise AtlasError(
            f"resume-from: the checkpoint already ends round {ckpt.server_round}, and num-server-rounds = "
            f"{rounds}: raise num-server-rounds to train further"
        )
    return ckpt
