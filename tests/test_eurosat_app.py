"""The EuroSAT workload through the real ServerApp/ClientApp code on the in-process LocalGrid:
FedAvg rounds with central test evaluation, bytes from the real messages per precision, the time limit."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, RecordDict
from safetensors.numpy import load_file

from atlas_flwr.client.identity import client_identity
from atlas_flwr.client_app import app as client_app
from atlas_flwr.common.config import Config
from atlas_flwr.common.errors import AtlasError
from atlas_flwr.eurosat.data import default_npz
from atlas_flwr.eurosat.model import build_model, exchanged_state, load_exchanged
from atlas_flwr.eurosat.server import MODEL_FILE, run_eurosat
from atlas_tools.local_grid import LocalGrid
from tests.test_fault_tolerance import CrashingGrid


@pytest.fixture()
def eurosat_config(run_config: dict) -> dict:
    path = Path(os.environ.get("ATLAS_EUROSAT_DATA") or default_npz())
    if not path.is_file():
        pytest.fail(f"EuroSAT npz not found at {path}: set ATLAS_EUROSAT_DATA")
    run_config.update(
        {
            "workload": "eurosat",
            "eurosat-data": str(path),
            "eurosat-clients": 3,
            "max-samples-per-client": 16,
            "max-eval-samples": 32,
            "num-server-rounds": 2,
            "batch-size": 8,
            "lr": 0.05,
            "weight-decay": 0.0005,
        }
    )
    return run_config


def _run(values: dict) -> Path:
    cfg = Config.from_run_config(values)
    return run_eurosat(LocalGrid(client_app, values, cfg.num_clients), cfg)


def test_fedavg_rounds_evaluate_centrally_and_save_the_model(eurosat_config: dict) -> None:
    run_dir = _run({**eurosat_config, "run-name": "fp32"})
    rounds = json.loads((run_dir / "rounds.json").read_text())
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert all(0.0 <= r["test-accuracy"] <= 1.0 for r in rounds)
    state = exchanged_state(build_model(0))
    raw = sum(v.nbytes for v in state.values())
    for r in rounds[1:]:
        assert r["failures"] == 0 and np.isfinite(r["train-loss"])
        # 3 clients: the model down (fp32, with array headers) and an fp32 update up, per client
        assert r["bytes-sent"] == r["bytes-received"] and 3 * raw < r["bytes-sent"] < 3 * raw * 1.05
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rounds-completed"] == 2 and summary["stopped-by"] == "num-server-rounds"
    model = build_model(1)
    load_exchanged(model, load_file(str(run_dir / MODEL_FILE)))  # every exchanged tensor is in the file
    clients = json.loads((run_dir / "clients.json").read_text())
    assert [c["client-id"] for c in clients] == [0, 1, 2] and all(c["num-examples"] == 16 for c in clients)


def test_precisions_change_the_bytes_on_the_wire(eurosat_config: dict) -> None:
    per_round = {}
    for precision in ("fp32", "fp16", "int8"):
        # The bytes do not depend on how much a client trains: one step each.
        values = {**eurosat_config, "precision": precision, "num-server-rounds": 1, "run-name": precision}
        values |= {"max-samples-per-client": 8, "max-eval-samples": 16}
        summary = json.loads((_run(values) / "summary.json").read_text())
        per_round[precision] = summary["bytes-sent-per-round"] + summary["bytes-received-per-round"]
        assert summary["test-accuracy"] >= 0.0
    assert per_round["fp16"] < 0.51 * per_round["fp32"]
    assert per_round["int8"] < 0.27 * per_round["fp32"]


def test_time_limit_stops_between_rounds_and_keeps_the_model(eurosat_config: dict) -> None:
    values = {**eurosat_config, "num-server-rounds": 50, "time-limit-minutes": 0.0001, "run-name": "limited"}
    values["max-samples-per-client"] = 8
    run_dir = _run(values)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stopped-by"] == "time-limit-minutes" and summary["rounds-completed"] == 1
    assert [r["round"] for r in json.loads((run_dir / "rounds.json").read_text())] == [0, 1]
    assert (run_dir / MODEL_FILE).stat().st_size > 1_000_000


def test_eurosat_clients_must_match_the_population(eurosat_config: dict) -> None:
    context = Context(
        run_id=1,
        node_id=1,
        node_config={"partition-id": 0, "num-partitions": 4},
        state=RecordDict(),
        run_config=eurosat_config,
    )
    with pytest.raises(AtlasError, match="eurosat-clients = 3"):
        client_identity(context)


def test_a_crashed_run_resumes_to_the_uninterrupted_result(eurosat_config: dict) -> None:
    import torch

    # One thread: oneDNN's threaded convolution backward sums in varying order, and over 3 rounds that
    # drift once passed the tolerance below; the resume itself is what is tested.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _crash_and_resume(eurosat_config)
    finally:
        torch.set_num_threads(threads)


def _crash_and_resume(eurosat_config: dict) -> None:
    values = {**eurosat_config, "num-server-rounds": 3, "lr-schedule": "cosine"}
    whole = _run({**values, "run-name": "whole"})
    cfg = Config.from_run_config(values)
    with pytest.raises(SystemExit):
        run_eurosat(CrashingGrid(client_app, values, cfg.num_clients, crash_at=3), replace(cfg, run_name="crashed"))
    crashed = Path(values["output-dir"]) / "crashed"
    assert json.loads((crashed / "checkpoint" / "state.json").read_text())["round"] == 2
    resumed = _run({**values, "resume-from": str(crashed)})
    assert resumed == crashed
    rows = [json.loads((d / "rounds.json").read_text()) for d in (whole, crashed)]
    strip = [[{k: v for k, v in r.items() if "seconds" not in k} for r in run] for run in rows]
    assert [r["round"] for r in strip[1]] == [0, 1, 2, 3]
    # Two identical uninterrupted runs already differ in the 7th digit (oneDNN's threaded convolution
    # backward sums in varying order), so the resumed run is held to that, not to bit equality.
    for want, got in zip(strip[0], strip[1], strict=True):
        assert got == pytest.approx(want, rel=1e-4, abs=1e-5)
    a, b = (load_file(str(d / MODEL_FILE)) for d in (whole, crashed))
    assert set(a) == set(b) and all(np.allclose(a[k], b[k], rtol=1e-3, atol=1e-5) for k in a)
