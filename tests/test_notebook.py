"""The analysis notebook runs end to end (nbclient) on tiny run outputs and shows every table and figure."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from tests.conftest import ROOT
from tests.test_report import _write_run


def test_analysis_notebook_executes_on_tiny_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runs = tmp_path / "runs"
    for seed, (fed, atlas) in enumerate([([0.6, 0.7], [0.8, 0.9]), ([0.62, 0.68], [0.79, 0.88])]):
        _write_run(runs, "fedavg", seed, fed)
        _write_run(runs, "atlas", seed, atlas)
    monkeypatch.setenv("ATLAS_RUNS", str(runs))
    monkeypatch.setenv("ATLAS_REFERENCE", "fedavg")
    notebook = nbformat.read(ROOT / "notebooks" / "analysis.ipynb", as_version=4)
    NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    text = "".join(
        out.get("text", "") + "".join(out.get("data", {}).get("text/markdown", ""))
        for cell in notebook.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
    )
    assert "4 runs under" in text and "| atlas |" in text and "| fedavg |" in text
    images = [out for cell in notebook.cells for out in cell.get("outputs", []) if "image/png" in out.get("data", {})]
    assert len(images) >= 3  # convergence, clients heatmap, communication (plus graph and ranks when present)
