"""Devices as both sides see them: a memory budget and a rank cap per simulated tier, and sizes in bytes.

The client describes its device with these; the server's memory model (``strategies/memory``) plans with
them. Pure Python: no Flower, no torch.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

_DECIMAL = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_UNITS = _DECIMAL | {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


@dataclass(frozen=True)
class DeviceProfile:
    """A simulated device: a name, the memory a client may use for training (bytes) and its rank cap.

    ``max_rank`` (0: none) stands for what memory does not price: compute and uplink. Heterogeneous-rank
    methods (HetLoRA, FlexLoRA) assign ranks by such device classes.
    """

    name: str
    memory_bytes: int
    max_rank: int = 0


def profile_for(
    partition_id: int,
    tiers: Sequence[str] = ("2GB", "4GB", "8GB", "16GB"),
    scale: float = 1.0,
    rank_tiers: Sequence[int] = (),
) -> DeviceProfile:
    """The device tier of a client: tiers cycle with the partition id, memory multiplied by ``scale``.

    ``rank_tiers`` (empty: no cap) cycle the same way, so partition ``i`` gets memory tier ``i % len(tiers)``
    and rank cap ``rank_tiers[i % len(rank_tiers)]``.

    A ``scale`` below 1 shrinks every tier so that a small model (MiniLM needs about 0.1 GB) still meets
    a binding budget.

    Parameters
    ----------
    partition_id : int
        Client's partition (>= 0).
    tiers : sequence of str
        Sizes such as ``"4GB"``.
    scale : float
        Positive factor applied to every tier.
    rank_tiers : sequence of int
        Rank caps (>= 1), cycled by partition id.

    Returns
    -------
    DeviceProfile
    """
    if not isinstance(partition_id, int) or partition_id < 0:
        raise ValueError(f"partition_id {partition_id!r} is invalid: expected an integer >= 0")
    if not tiers:
        raise ValueError("tiers is empty: expected at least one size such as '4GB'")
    if not scale > 0:
        raise ValueError(f"scale {scale!r} is invalid: expected a number > 0")
    if any(int(r) < 1 for r in rank_tiers):
        raise ValueError(f"rank tiers {list(rank_tiers)} are invalid: expected integers >= 1")
    tier = tiers[partition_id % len(tiers)]
    name = tier if scale == 1 else f"{tier}x{scale:g}"
    max_rank = int(rank_tiers[partition_id % len(rank_tiers)]) if rank_tiers else 0
    if max_rank:
        name += f"/r{max_rank}"
    return DeviceProfile(name, int(parse_size(tier) * scale), max_rank)


def parse_size(text: str) -> int:
    """Bytes in a size such as ``"1.5GB"``: GB = 1e9, GiB = 2**30 (also B, KB, MB, TB, KiB, MiB, TiB).

    Parameters
    ----------
    text : str
        A non-negative number followed by a unit (case-insensitive, spaces allowed).

    Returns
    -------
    int
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]+)\s*", str(text))
    unit = match.group(2).upper() if match else ""
    if unit not in _UNITS:
        raise ValueError(f"size {text!r} is invalid: expected a number and a unit (GB, GiB, MB, MiB, KB, KiB, B, TB)")
    return int(float(match.group(1)) * _UNITS[unit])


def format_size(num_bytes: float) -> str:
    """A short decimal size for messages: ``1.5 GB``, ``91 MB``, ``512 B``.

    Parameters
    ----------
    num_bytes : float
        A size in bytes.

    Returns
    -------
    str
    """
    for unit in ("TB", "GB", "MB", "kB"):
        scale = _UNITS[unit.upper()]
        if abs(num_bytes) >= scale:
            return f"{num_bytes / scale:.3g} {unit}"
    return f"{num_bytes:.0f} B"
