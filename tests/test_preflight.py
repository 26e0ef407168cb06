"""preflight: one-line errors before any SuperLink starts, and only for what the workload uses."""

from __future__ import annotations

from pathlib import Path

import pytest

from atlas_flwr.common.config import Config
from atlas_flwr.common.errors import DataError, ModelError
from atlas_flwr.server.preflight import preflight


def test_glue_runs_need_a_known_model(run_config: dict) -> None:
    with pytest.raises(ModelError, match="unknown model 'no-such-model'"):
        preflight(Config.from_run_config({**run_config, "model": "no-such-model"}))


def test_eurosat_runs_need_neither_the_language_model_nor_glue(run_config: dict, tmp_path: Path) -> None:
    npz = tmp_path / "eurosat_rgb_jpeg.npz"
    npz.write_bytes(b"")  # existence is what preflight checks; the loader checks the arrays
    values = {**run_config, "workload": "eurosat", "model": "no-such-model", "data-dir": str(tmp_path / "no-glue")}
    preflight(Config.from_run_config({**values, "eurosat-data": str(npz)}))
    with pytest.raises(DataError, match="missing.npz' not found"):
        preflight(Config.from_run_config({**values, "eurosat-data": str(tmp_path / "missing.npz")}))
