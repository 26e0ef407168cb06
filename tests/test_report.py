"""atlas-report: tables over seeds, the paired comparison, figures, and one-line errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from atlas_flwr.report import main
from atlas_flwr.results import RunWriter


def _write_run(root: Path, strategy: str, seed: int, sst2: list[float], extra: dict | None = None) -> None:
    """A run as the ServerApp writes it: 2 sst2 clients, 2 rounds."""
    (root / f"{strategy}-{seed}").mkdir(parents=True)
    writer = RunWriter(
        root / f"{strategy}-{seed}",
        {"run-config": {"strategy": strategy, "seed": seed, "tasks": "sst2", **(extra or {})}},
    )
    for rnd in (1, 2):
        acc = float(np.mean(sst2)) - (0.1 if rnd == 1 else 0.0)
        writer.add_round(
            {
                "round": rnd,
                "sst2-accuracy": acc,
                "sst2-f1": acc,
                "sst2-mcc": acc / 2,
                "mean-main-metric": acc,
                "bytes-sent": 2e6,
                "bytes-received": 1e6,
                "round-seconds": 10.0,
            }
        )
    writer.write_clients(
        [{"client-id": i, "task": "sst2", "accuracy": a, "f1": a, "mcc": a} for i, a in enumerate(sst2)]
    )
    ranks = [
        {
            "client-id": i,
            "device": "2GB",
            "ranks-per-layer": "0 8",
            "predicted-peak-bytes": 100e6 + i,
            "fits-budget": i == 0,
            "budget-binds": True,
        }
        for i in range(2)
    ]
    writer.write_table("ranks", ranks)
    writer.write_json("adjacency.json", {"client-ids": [0, 1], "a": [[0, 0.5], [0.5, 0]]})
    writer.write_json("clusters.json", {"groups": [0, 0]})
    writer.write_summary({"rounds": 2})


def test_tables_figures_and_paired_comparison(tmp_path: Path, capsys) -> None:
    runs = tmp_path / "runs"
    _write_run(runs, "fedavg", 1, [0.70, 0.80])
    _write_run(runs, "fedavg", 2, [0.72, 0.78])
    _write_run(runs, "atlas", 1, [0.75, 0.81], {"aggregation": "zero-pad"})
    _write_run(runs, "atlas", 2, [0.71, 0.90], {"aggregation": "zero-pad"})
    out = tmp_path / "report"
    assert main([str(runs), "--out", str(out)]) == 0
    methods = (out / "methods.md").read_text()
    # fedavg: final mean-main per seed 0.75 and 0.75 -> 0.750 ± 0.000; worst clients 0.70 and 0.72.
    assert "| fedavg | 2 | 0.750 ± 0.000 |" in methods
    assert "0.710 ± 0.014" in methods
    assert "atlas+aggregation=zero-pad" in methods and "| 100 | 1 |" in methods
    paired = (out / "paired.csv").read_text().splitlines()
    # pairs: (+0.05, +0.01, -0.01, +0.12): mean +0.0425, 3 wins, 1 loss
    assert paired[1].startswith("atlas+aggregation=zero-pad,fedavg,4,+0.0425,3 / 0 / 1,")
    for name in ("convergence", "clients-heatmap", "adjacency", "ranks", "communication"):
        assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_missing_input_is_one_line_and_exit_2(tmp_path: Path, capsys) -> None:
    assert main([str(tmp_path / "nope"), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "does not exist" in err
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "summary.json").write_text("{}")
    assert main([str(tmp_path / "broken"), "--out", str(tmp_path / "r")]) == 2
    assert "config.json is missing" in capsys.readouterr().err


@pytest.mark.parametrize("reference", ["fedavg", "absent"])
def test_reference_choice(tmp_path: Path, reference: str) -> None:
    _write_run(tmp_path / "runs", "fedavg", 1, [0.7, 0.8])
    assert main([str(tmp_path / "runs"), "--out", str(tmp_path / "r"), "--reference", reference]) == 0
    assert (tmp_path / "r" / "paired.md").read_text() == ""
