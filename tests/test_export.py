"""Export -> load with PEFT -> predict round-trips (issue 20 item 5)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from atlas_flwr.client.local import client_data, loaded_model
from atlas_flwr.client_app import app as client_app
from atlas_flwr.common.checkpoint import load_checkpoint
from atlas_flwr.common.config import Config
from atlas_flwr.data import task_spec
from atlas_flwr.data.glue import eval_rows
from atlas_flwr.server_app import run_federation
from atlas_tools.export import export_main, export_run, load_exported, predict, predict_main
from atlas_tools.local_grid import LocalGrid


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, glue_dir: str, tiny_models: dict) -> tuple[Config, Path]:
    import tomllib

    root = Path(__file__).resolve().parents[1]
    with (root / "pyproject.toml").open("rb") as fh:
        values = dict(tomllib.load(fh)["tool"]["flwr"]["app"]["config"])
    values |= {
        "strategy": "flexlora",
        "model": tiny_models["bert"],
        "data-dir": glue_dir,
        "output-dir": str(tmp_path_factory.mktemp("export-run")),
        "tasks": "sst2,mrpc",
        "clients-per-task": 2,
        "max-samples-per-client": 24,
        "max-eval-samples": 16,
        "num-server-rounds": 1,
        "batch-size": 8,
        "lr": 0.01,
        "max-length": 32,
        "lora-rank": 4,
        "rank-tiers": "2,4",
    }
    cfg = Config.from_run_config(values)
    return cfg, run_federation(LocalGrid(client_app, values, cfg.num_clients), cfg).run_dir


def test_exported_folders_load_with_peft_and_give_the_runs_logits_and_metrics(run: tuple[Config, Path]) -> None:
    cfg, run_dir = run
    folders = export_run(run_dir)
    assert [f.name for f in folders] == [f"client-{i}" for i in range(4)]
    ckpt = load_checkpoint(run_dir)
    final = {r["client-id"]: r for r in json.loads((run_dir / "clients.json").read_text())}
    for client_id in (0, 1, 2):  # ranks 2 and 4 (rank tiers), sst2 and the pair task mrpc
        folder = folders[client_id]
        config = json.loads((folder / "adapter_config.json").read_text())
        assert set(config["rank_pattern"].values()) == {2 if client_id % 2 == 0 else 4}
        assert (folder / "adapter_model.safetensors").is_file()
        task = json.loads((folder / "atlas.json").read_text())["task"]
        model, _, _ = load_exported(folder)
        reference = loaded_model(cfg, task, ckpt.adapters[client_id], ckpt.heads[client_id]).eval()
        batch = client_data(cfg, client_id).eval[:8]
        import torch

        with torch.inference_mode():
            inputs = {k: torch.nn.utils.rnn.pad_sequence([torch.tensor(x) for x in batch[k]], batch_first=True)
                      for k in ("input_ids", "attention_mask")}  # fmt: skip
            np.testing.assert_allclose(model(**inputs).numpy(), reference(**inputs).numpy(), rtol=1e-5, atol=1e-6)
        spec = task_spec(task)
        rows = eval_rows(task, data_dir=cfg.resolved_data_dir(), max_samples=cfg.max_eval_samples, seed=cfg.seed)
        logits = predict(folder, [[r[c] for c in spec.text_columns] for r in rows])
        accuracy = float(np.mean(logits.argmax(axis=1) == np.asarray(rows["label"])))
        assert accuracy == pytest.approx(final[client_id]["accuracy"])


def test_atlas_predict_prints_one_line_per_row_and_refuses_bad_input(
    run: tuple[Config, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    _, run_dir = run
    assert export_main([str(run_dir), "--out", str(tmp_path / "e"), "--clients", "0,2"]) == 0
    sst2, mrpc = tmp_path / "e" / "client-0", tmp_path / "e" / "client-2"
    assert capsys.readouterr().out.split() == [str(sst2), str(mrpc)]
    assert predict_main([str(sst2), "--text", "a gripping film"]) == 0
    label, *probs = capsys.readouterr().out.strip().split("\t")
    assert label in ("0", "1") and sum(map(float, probs)) == pytest.approx(1.0, abs=1e-3)
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"sentence1": "A cat sat.", "sentence2": "A cat was sitting."}\n' * 3)
    assert predict_main([str(mrpc), "--file", str(rows), "--out", str(tmp_path / "p.csv")]) == 0
    assert len((tmp_path / "p.csv").read_text().splitlines()) == 4
    capsys.readouterr()
    bad = [
        ([str(mrpc), "--text", "only one"], "give --pair exactly when it has two columns"),
        ([str(tmp_path), "--text", "x"], "is not an exported model"),
        ([str(sst2), "--file", str(tmp_path / "none.csv")], "not found"),
    ]
    for args, needle in bad:
        assert predict_main(args) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and needle in err, err
    assert export_main([str(run_dir), "--clients", "9"]) == 2
    assert "is not a client" in capsys.readouterr().err


def test_every_rounds_scalars_are_in_tensorboard(run: tuple[Config, Path]) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, run_dir = run
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    rounds = json.loads((run_dir / "rounds.json").read_text())
    for key in ("sst2-accuracy", "mrpc-f1", "train-loss", "bytes-sent"):
        assert [(e.step, e.value) for e in events.Scalars(key)] == [(r["round"], pytest.approx(r[key])) for r in rounds]
