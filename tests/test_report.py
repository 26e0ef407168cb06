"""atlas-report: tables over seeds, the paired comparison, figures, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from atlas_flwr.common.results import RunWriter
from atlas_tools.report import main


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
    # (seed, task) units: task means 0.78 - 0.75 and 0.805 - 0.75: mean +0.0425, 2 wins. Per client they
    # would be 4 pairs with a loss among them (+0.05, +0.01, -0.01, +0.12): the clients share evaluation rows.
    assert paired[0].startswith('method,reference,"pairs (seed, task)",')
    assert paired[1].startswith("atlas+aggregation=zero-pad,fedavg,2,+0.0425,2 / 0 / 0,")
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


def test_split_and_precision_runs_are_methods_of_their_own(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    _write_run(runs, "fedavg", 1, [0.70, 0.80])
    _write_run(runs / "s", "fedavg", 1, [0.60, 0.60], {"split": "auto"})
    # Both split clients fit (ranks.json says one federated client would not); a third would not fit.
    split = [{"client-id": i, "cut": 1, "client-predicted-bytes": 50e6, "memory-budget-bytes": 60e6} for i in (0, 1)]
    (runs / "s" / "fedavg-1" / "split.json").write_text(json.dumps(split))
    _write_run(runs / "p", "fedavg", 1, [0.50, 0.50], {"precision": "int8", "split": "none"})
    assert main([str(runs), "--out", str(tmp_path / "r")]) == 0
    methods = (tmp_path / "r" / "methods.md").read_text()
    for label, mean in (("fedavg", "0.750"), ("fedavg+split=auto", "0.600"), ("fedavg+precision=int8", "0.500")):
        assert f"| {label} | 1 | " in methods and mean in methods
    over = {line.split(" | ")[0][2:]: line.rstrip(" |").split(" | ")[-1] for line in methods.splitlines()[2:]}
    assert over == {"fedavg": "1", "fedavg+split=auto": "0", "fedavg+precision=int8": "1"}


def test_readme_section_is_rewritten_between_its_markers_only(tmp_path: Path, capsys) -> None:
    runs = tmp_path / "runs"
    _write_run(runs, "fedavg", 1, [0.70, 0.80])
    _write_run(runs, "atlas", 1, [0.75, 0.81])
    readme = tmp_path / "README.md"
    readme.write_text(
        "# Title\n\nbefore\n<!-- atlas-report:results -->\nstale table\n<!-- /atlas-report:results -->\nafter\n"
    )
    assert main([str(runs), "--out", str(tmp_path / "r"), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith(
        "# Title\n\nbefore\n<!-- atlas-report:results -->\n| method | seeds | k / ARI | sst2 accuracy |"
    )
    assert text.endswith("<!-- /atlas-report:results -->\nafter\n") and "stale" not in text
    assert "| atlas | fedavg | 1 | +0.0300 | 1 / 0 / 0 |" in text  # the paired table follows
    # Idempotent: a second run leaves the file as it is.
    assert main([str(runs), "--out", str(tmp_path / "r"), "--readme", str(readme)]) == 0
    assert readme.read_text() == text
    readme.write_text("no markers here\n")
    assert main([str(runs), "--out", str(tmp_path / "r"), "--readme", str(readme)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "<!-- atlas-report:results -->" in err
    assert readme.read_text() == "no markers here\n"  # nothing lost


#: The generated sections of docs/results.md: the runs each is made of, the reference method, the marker name.
README_REPORTS = [
    (["benchmarks/results/protocol"], "fedavg", "protocol"),
    (["benchmarks/results/quality"], "atlas+laplacian=median,held", "quality"),
    (["benchmarks/results/quality-rows"], "fedavg-cluster", "default-rows"),
    (
        ["benchmarks/results/protocol-v2"]
        + [
            f"benchmarks/results/protocol-v2-levers/{label}-s{seed}"
            for label in (
                "atlas+graph-cluster+aggregate",
                "atlas-split+graph-cluster+aggregate",
                "atlas+graph-cluster+aggregate+keep-length",
                "fedavg-cluster+split-auto",
            )
            for seed in (42, 43, 44)
        ],
        "fedavg-cluster",
        "protocol-v2",
    ),
    (
        [
            f"benchmarks/results/protocol/fedavg-cluster{split}{seed}"
            for split in ("", "+split-auto")
            for seed in ("-s42", "-s43", "-s44")
        ],
        "fedavg-cluster",
        "split-vs-federated",
    ),
    (
        [
            f"benchmarks/results/protocol/{method}{seed}"
            for method in ("atlas", "atlas-no-laplacian")
            for seed in ("-s42", "-s43", "-s44")
        ],
        "atlas-no-laplacian",
        "laplacian",
    ),
]


@pytest.mark.parametrize(("runs", "reference", "section"), README_REPORTS, ids=[r[2] for r in README_REPORTS])
def test_the_readme_results_are_the_committed_runs_report(
    tmp_path: Path, runs: list[str], reference: str, section: str
) -> None:
    """The result tables of docs/results.md are atlas-report's output on the committed runs, not typed in."""
    root = Path(__file__).resolve().parents[1]
    readme = tmp_path / "results.md"
    readme.write_text((root / "docs/results.md").read_text())
    args = [*(str(root / r) for r in runs), "--out", str(tmp_path / "r"), "--readme", str(readme)]
    assert main([*args, "--reference", reference, "--section", section]) == 0
    assert readme.read_text() == (root / "docs/results.md").read_text(), (
        f"docs/results.md is out of date: run the atlas-report command above its {section} table"
    )


def _benchmark(name: str):
    """A script of benchmarks/ as a module (the folder is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / f"benchmarks/{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_readme_eurosat_tables_are_the_committed_results() -> None:
    """The EuroSAT tables of docs/eurosat.md are benchmarks/eurosat_table.py's output on the committed results."""
    from atlas_tools.report import update_section

    root = Path(__file__).resolve().parents[1]
    module = _benchmark("eurosat_table")
    readme = (root / "docs/eurosat.md").read_text()
    expected = readme
    for name, body in module.readme_sections(root / "benchmarks/results/eurosat").items():
        expected = update_section(expected, name, body)
    assert "| fp32 |" in expected
    assert readme == expected, (
        "docs/eurosat.md is out of date: run python benchmarks/eurosat_table.py --readme docs/eurosat.md"
    )


def test_the_readme_communication_table_is_the_committed_one() -> None:
    from atlas_tools.report import update_section

    root = Path(__file__).resolve().parents[1]
    readme = (root / "docs/results.md").read_text()
    table = (root / "benchmarks/results/communication/communication.md").read_text()
    assert readme == update_section(readme, "communication", table), (
        "docs/results.md is out of date: run python benchmarks/communication.py --readme docs/results.md"
    )


def test_the_readme_split_cuts_table_is_the_committed_one() -> None:
    from atlas_tools.report import update_section

    root = Path(__file__).resolve().parents[1]
    module = _benchmark("split_cuts")
    rows = json.loads((root / "benchmarks/results/split/split.json").read_text())["rows"]
    readme = (root / "docs/split-learning.md").read_text()
    assert readme == update_section(readme, "split-cuts", module.table(rows)), (
        "docs/split-learning.md is out of date: run python benchmarks/split_cuts.py --table benchmarks/results/split "
        "--readme docs/split-learning.md"
    )


def test_the_readme_overhead_table_is_the_committed_results() -> None:
    from atlas_tools.report import update_section

    root = Path(__file__).resolve().parents[1]
    body = _benchmark("overhead_table").table(root / "benchmarks/results/overhead")
    assert "16 cores, NVIDIA H200" in body and "2 cores, CPU, 1 thread(s)" in body
    readme = (root / "docs/results.md").read_text()
    assert readme == update_section(readme, "overhead", body), (
        "docs/results.md is out of date: run python benchmarks/overhead_table.py --readme docs/results.md"
    )


def test_a_switch_the_method_does_not_use_names_no_variant(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    _write_run(runs, "centralized", 1, [0.8, 0.8], {"server-lr": 2.0})
    _write_run(runs, "fedavg", 1, [0.7, 0.8], {"server-lr": 2.0})
    # centralized aggregates nothing: its summary records the server step it used, none.
    (runs / "centralized-1" / "summary.json").write_text(json.dumps({"rounds": 2, "switches": {"server-lr": 1.0}}))
    assert main([str(runs), "--out", str(tmp_path / "r")]) == 0
    methods = (tmp_path / "r" / "methods.md").read_text()
    assert "| centralized | 1 |" in methods and "| fedavg+server-lr=2.0 | 1 |" in methods


def test_the_ablation_table_in_the_docs_is_what_its_command_writes() -> None:
    import subprocess
    import sys

    from atlas_tools.report import update_section

    docs = Path("docs/results.md").read_text()
    out = subprocess.run(
        [sys.executable, "benchmarks/ablation_pairs.py"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert update_section(docs, "protocol-v2-ablations", out) == docs, "run benchmarks/ablation_pairs.py --readme"


def test_a_label_names_switches_away_from_the_presets_own() -> None:
    from atlas_tools.report import method_label

    # atlas-split sets split = auto itself; atlas with split = auto, or atlas-split at a fixed cut, is a variant.
    assert method_label({"strategy": "atlas-split", "split": "auto"}) == "atlas-split"
    assert method_label({"strategy": "atlas-split", "split": "3"}) == "atlas-split+split=3"
    assert method_label({"strategy": "atlas", "split": "auto"}) == "atlas+split=auto"
    assert method_label({"strategy": "fedavg-cluster", "split": "auto"}) == "fedavg-cluster+split=auto"
