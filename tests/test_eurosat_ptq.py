"""atlas-ptq end to end on a briefly trained CNN: four variants saved, reloaded and measured."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from atlas_flwr.eurosat.data import default_npz, load_eurosat
from atlas_flwr.eurosat.model import build_model, exchanged_state
from atlas_flwr.eurosat.ptq import VARIANTS, main
from atlas_flwr.eurosat.train import train_local


@pytest.fixture(scope="module")
def npz() -> str:
    path = Path(os.environ.get("ATLAS_EUROSAT_DATA") or default_npz())
    if not path.is_file():
        pytest.fail(f"EuroSAT npz not found at {path}: set ATLAS_EUROSAT_DATA")
    return str(path)


def test_ptq_compares_every_variant_and_static_int8_is_much_smaller(npz: str, tmp_path: Path, capsys) -> None:
    import torch

    data = load_eurosat(npz)
    idx = np.random.default_rng(0).choice(data.train_indices(), 256, replace=False)
    model = build_model(0)
    train_local(
        model,
        data.images(idx),
        data.labels[idx],
        epochs=1,
        batch_size=32,
        lr=0.05,
        weight_decay=0.0,
        precision="fp32",
        device=torch.device("cpu"),
        seed=0,
    )
    path = tmp_path / "model.safetensors"
    save_file(exchanged_state(model), str(path), metadata={"clients": "10", "rounds": "3"})
    out = tmp_path / "ptq"
    args = [str(path), "--data", npz, "--output-dir", str(out), "--max-test", "128", "--calibration-images", "64"]
    assert main([*args, "--repeats", "1", "--price-per-mb", "0.5"]) == 0
    assert "int8-static" in capsys.readouterr().out
    rows = {r["variant"]: r for r in json.loads((out / "ptq.json").read_text())}
    assert list(rows) == list(VARIANTS)
    fp32, static, dynamic = rows["fp32"], rows["int8-static"], rows["int8-dynamic"]
    assert static["compression-ratio"] >= 3.5 and 1.5 < dynamic["compression-ratio"] < static["compression-ratio"]
    assert 1.9 < rows["fp16"]["compression-ratio"] < 2.1
    assert fp32["communication-mb"] == pytest.approx(fp32["size-bytes"] / 1e6 * 2 * 10 * 3)
    assert fp32["communication-cost"] == pytest.approx(fp32["communication-mb"] * 0.5)
    for row in rows.values():
        assert (out / row["file"]).is_file() and row["latency-ms-per-batch"] > 0
        assert abs(row["accuracy-drop-pt"]) <= 10.0  # a barely trained model; the committed run shows the real drop
    assert (out / "ptq.png").stat().st_size > 10_000 and (out / "ptq.csv").is_file()


def test_ptq_bad_input_is_one_line(tmp_path: Path, capsys) -> None:
    assert main([str(tmp_path / "missing.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not found" in err
