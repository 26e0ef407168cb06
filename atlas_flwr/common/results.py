"""Run outputs: one directory per run with config, per-round and per-client results.

Every file is written atomically (temporary file, then rename), after every round, so a
crash never leaves a half-written file and never loses earlier rounds.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _csv_text(rows: Sequence[Mapping[str, Any]]) -> str:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def new_run_dir(root: Path, run_name: str) -> Path:
    """Create ``root/run_name``; an existing non-empty directory is never reused."""
    root.mkdir(parents=True, exist_ok=True)
    path, n = root / run_name, 1
    while path.exists() and any(path.iterdir()):
        path, n = root / f"{run_name}-{n}", n + 1
    path.mkdir(exist_ok=True)
    return path


def default_run_name(strategy: str, seed: int) -> str:
    """``<strategy>-s<seed>-<UTC timestamp>``."""
    return f"{strategy}-s{seed}-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"


class RunWriter:
    """Writes ``config.json``, ``rounds.json``/``.csv``, ``clients.json``/``.csv``, ``summary.json``.

    With ``tensorboard`` (a folder) every round's numeric values also go there as TensorBoard scalars,
    tagged ``<key>`` at step ``round``, as Flower and Hugging Face users expect to follow a run.
    """

    def __init__(self, run_dir: Path, config: Mapping[str, Any], tensorboard: Path | None = None) -> None:
        self.dir = run_dir
        self.rounds: list[dict[str, Any]] = []
        self._json("config.json", dict(config))
        self._tensorboard = tensorboard
        self._events: Any = None

    def _json(self, name: str, obj: Any) -> None:
        atomic_write(self.dir / name, json.dumps(obj, indent=2, sort_keys=False) + "\n")

    def add_round(self, row: Mapping[str, Any]) -> None:
        """Append one round's metrics and rewrite the round files."""
        self.rounds.append(dict(row))
        self._json("rounds.json", self.rounds)
        atomic_write(self.dir / "rounds.csv", _csv_text(self.rounds))
        if self._tensorboard is not None:
            self._scalars(row)

    def _scalars(self, row: Mapping[str, Any]) -> None:
        if self._events is None:
            from torch.utils.tensorboard import SummaryWriter

            self._events = SummaryWriter(log_dir=str(self._tensorboard))
        step = int(row["round"])
        for key, value in row.items():
            if key != "round" and isinstance(value, int | float) and math.isfinite(value):
                self._events.add_scalar(key, float(value), step)
        self._events.flush()

    def write_clients(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Per-client metrics (the latest evaluation of each client)."""
        self._json("clients.json", list(rows))
        atomic_write(self.dir / "clients.csv", _csv_text(rows))

    def write_json(self, name: str, obj: Any) -> None:
        """Any JSON-ready object as ``name``."""
        self._json(name, obj)

    def write_table(self, stem: str, rows: Sequence[Mapping[str, Any]]) -> None:
        """Rows as ``stem.json`` and ``stem.csv``."""
        self._json(f"{stem}.json", list(rows))
        atomic_write(self.dir / f"{stem}.csv", _csv_text(rows))

    def write_summary(self, summary: Mapping[str, Any]) -> None:
        """Final summary of the run (and the TensorBoard events closed)."""
        self._json("summary.json", dict(summary))
        if self._events is not None:
            self._events.close()
            self._events = None
