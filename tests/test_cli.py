"""atlas-run: config resolution and one-line errors before anything starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from atlas_tools.cli import main, parse_overrides, resolve_run_config
from tests.conftest import ROOT


def test_overrides_parse_as_toml_values() -> None:
    assert parse_overrides(["lr=0.01", "tasks='sst2,cola'", "strategy=local-only", "num-server-rounds=5"]) == {
        "lr": 0.01,
        "tasks": "sst2,cola",
        "strategy": "local-only",
        "num-server-rounds": 5,
    }


def test_paths_become_absolute_and_data_defaults_to_shared(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ATLAS_DATA_DIR", raising=False)
    values = resolve_run_config(ROOT, ROOT / "configs" / "smoke.toml", ["output-dir=out"])
    assert Path(values["output-dir"]).is_absolute() and values["output-dir"].endswith("/out")
    assert values["data-dir"] == str((ROOT.parent / "shared" / "data" / "glue").resolve())
    assert values["tasks"] == "sst2,mrpc" and values["run-name"].startswith("atlas-s42-")


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (
            ["--set", "strategy=fedprox"],
            "'strategy' = 'fedprox' is not allowed: expected one of centralized, local-only, fedavg, fedavg-cluster, homlora",
        ),
        (["--set", "tasks='sst2,wnli'"], "'tasks' = 'sst2,wnli'"),
        (["--set", "clients-per-task=0"], "'clients-per-task' = 0 is not allowed: expected an integer >= 1"),
        (["--set", "model=gpt5"], "unknown model 'gpt5'"),
        (["--set", "data-dir=/nonexistent/glue"], "data-dir '/nonexistent/glue' is not a directory"),
        (["configs/missing.toml"], "config file"),
        (["--set", "nonsense"], "is not key=value"),
        (["--set", "resume-from='/nonexistent/run'"], "resume-from '/nonexistent/run' holds no checkpoint"),
        (["--set", "min-clients=20"], "'min-clients' = 20 is not allowed: expected an integer <= the 8 clients"),
        (["--ray-cpus", "1", "--client-cpus", "2"], "--ray-cpus 1 is below --client-cpus 2"),
        (["--set", "seed=abc"], "'seed' = 'abc' is not allowed: expected an integer >= 0"),
        (["--set", "split=0"], "'split' = '0' is not allowed: expected none, auto, or a block index >= 1"),
        # Values that pass the type checks but not the model, the data, the devices or the disk.
        (["--set", "lora-rank=500"], "'lora-rank' = 500 is not allowed: expected an integer in [1, 384]"),
        (["--set", "split='99'"], "'split' = '99' is not allowed: expected none, auto, or a block index in 1..5"),
        (["--set", "split=6"], "block index in 1..5"),
        (["--set", "device-tiers='1MB'"], "'device-tiers' = '1MB' is not allowed: expected tiers x device-scale"),
        (["--set", "device-scale=0.001"], "cannot train one LoRA layer of minilm-l6"),
        (["--set", "clients-per-task=100000"], "expected at most the 67349 train rows of sst2"),
        (["--set", "output-dir='{tmp}/a-file/outputs'"], "is not a directory)"),
        (["--set", "workload='eurosat'", "--set", "eurosat-data='{tmp}/truncated.npz'"], "is not a readable npz"),
        (["--set", "lr=2.0"], "'lr' = 2.0 is not allowed: expected a number in (0.0, 1.0]"),
        (["--set", "server-lr=0"], "'server-lr' = 0.0 is not allowed: expected a number in (0.0, 10.0]"),
        (["--set", "frozen-layers='keep'"], "'frozen-layers' = 'keep' is not allowed: expected one of use, drop"),
        (["--set", "factor-split='even'"], "expected one of balanced, a-orthonormal"),
        (
            ["--set", "over-budget='ignore'"],
            "'over-budget' = 'ignore' is not allowed: expected one of shrink, drop, train",
        ),
        (["--set", "rank-tiers='2,x'"], "'rank-tiers' = '2,x' is not allowed: expected empty (no cap) or a comma"),
        (["--set", "rank-tiers='0,4'"], "'rank-tiers' = '0,4'"),
        (["--set", "max-samples-by-task='cola:-1'"], "'max-samples-by-task' = 'cola:-1' is not allowed"),
        (["--set", "max-samples-by-task='wnli:5'"], "task:rows pairs"),
        (["--set", "dp-noise=1.0"], "'dp-noise' = 1.0 is not allowed: expected 0 unless dp-clip > 0"),
        (["--set", "dp-clip=1.0", "--set", "split='auto'"], "'dp-clip' = 1.0 is not allowed: expected 0 with split"),
        (["--set", "hetlora-gamma=0"], "'hetlora-gamma' = 0.0 is not allowed: expected a number in (0.0, 1.0]"),
        (["--set", "aggregation='mean'"], "'aggregation' = 'mean' is not allowed"),
        (["--set", "ranks='dense'"], "'ranks' = 'dense' is not allowed"),
        (["--set", "laplacian-eta=1.5"], "'laplacian-eta' = 1.5 is not allowed: expected a number in [0.0, 1.0]"),
        (["--set", "precision='int4'"], "'precision' = 'int4' is not allowed: expected one of fp32, fp16, int8"),
        (["--set", "batch-size=0"], "'batch-size' = 0 is not allowed: expected an integer >= 1"),
        (["--set", "max-length=4"], "'max-length' = 4 is not allowed: expected an integer >= 8"),
        (["--set", "device='tpu'"], "'device' = 'tpu' is not allowed: expected one of auto, cpu, cuda"),
        (["--set", "pooling='max'"], "'pooling' = 'max' is not allowed"),
        (["--set", "num-server-rounds=0"], "'num-server-rounds' = 0 is not allowed: expected an integer >= 1"),
        (["--set", "lr-schedule='step'"], "'lr-schedule' = 'step' is not allowed"),
        (["--set", "split='auto'", "--set", "precision='int8'"], "'precision' = 'int8' is not allowed: expected fp32"),
        (["--set", "learning-rate=0.1"], "'learning-rate'"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(capsys, args: list, needle: str, monkeypatch, tmp_path) -> None:
    monkeypatch.chdir(ROOT)
    (tmp_path / "a-file").write_text("a file where a folder should be")
    (tmp_path / "truncated.npz").write_bytes(b"PK\x03\x04 cut short")
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    assert main([*args, "--check", "--app", str(ROOT)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and needle in err and "Traceback" not in err, err


def test_flower_tool_prefers_the_interpreters_own_then_path_then_names_what_is_missing(tmp_path, monkeypatch) -> None:
    from atlas_flwr.common.errors import AtlasError
    from atlas_tools.launch import flower_tool

    venv_bin, on_path = tmp_path / "venv" / "bin", tmp_path / "target" / "bin"
    for folder in (venv_bin, on_path):
        folder.mkdir(parents=True)
        (folder / "flwr").write_text("#!/bin/sh\n")
        (folder / "flwr").chmod(0o755)
    monkeypatch.setattr("sys.executable", str(venv_bin / "python3"))
    monkeypatch.setenv("PATH", str(on_path))
    assert flower_tool("flwr") == str(venv_bin / "flwr")
    # pip install --target: the scripts are on PATH, not beside the interpreter.
    (venv_bin / "flwr").unlink()
    assert flower_tool("flwr") == str(on_path / "flwr")
    (on_path / "flwr").unlink()
    with pytest.raises(AtlasError, match="'flwr' command is neither beside .* nor on PATH"):
        flower_tool("flwr")
