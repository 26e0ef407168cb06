"""Take the model away: export a run's final adapters as PEFT folders, and classify text with one.

    atlas-export RUN_DIR [--out DIR] [--clients 0,3]
    atlas-predict EXPORT_DIR/client-0 --text "a gripping, funny film"
    atlas-predict EXPORT_DIR/client-2 --text "The cat sat." --pair "A cat was sitting."
    atlas-predict EXPORT_DIR/client-0 --file rows.csv [--out predictions.csv]

An exported folder is what ``PeftModel.from_pretrained(base, folder)`` loads (``adapter_config.json``
with the rank pattern, ``adapter_model.safetensors``), plus ``head.safetensors`` (the task head) and
``atlas.json``: the base model (alias and path), task, labels, pooling, max length, the client, the
round and its final metrics in the run. Nothing is pickled.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from atlas_flwr.common.errors import AtlasError

INFO_FILE = "atlas.json"
HEAD_FILE = "head.safetensors"


def export_run(run_dir: Path, out: Path | None = None, clients: Sequence[int] | None = None) -> list[Path]:
    """Write one PEFT folder per client (``client-<id>``) from the run's last checkpoint; return them."""
    from safetensors.numpy import save_file

    from atlas_flwr.client.local import loaded_model
    from atlas_flwr.common.checkpoint import load_checkpoint
    from atlas_flwr.common.config import Config
    from atlas_flwr.models.registry import resolve_model

    ckpt = load_checkpoint(run_dir)
    cfg = Config.from_run_config(ckpt.meta["run-config"])
    tasks = {int(m["client-id"]): str(m["task"]) for m in ckpt.meta["members"]}
    chosen = sorted(tasks) if clients is None else list(clients)
    unknown = sorted(set(chosen) - set(tasks))
    if unknown:
        raise AtlasError(f"--clients {unknown[0]} is not a client of {run_dir}: expected ids in {sorted(tasks)}")
    out = out or Path(run_dir) / "export"
    folders = []
    for client_id in chosen:
        adapter, head = ckpt.adapters.get(client_id, {}), ckpt.heads[client_id]
        if not adapter:
            raise AtlasError(f"client {client_id} of {run_dir} holds no adapter: nothing to export")
        model = loaded_model(cfg, tasks[client_id], adapter, head)
        folder = out / f"client-{client_id}"
        model.backbone.save_pretrained(folder)
        save_file({k: np.ascontiguousarray(v) for k, v in head.items()}, str(folder / HEAD_FILE))
        info = {
            "model": cfg.model,
            "model-path": resolve_model(cfg.model).path,
            "task": tasks[client_id],
            "num-labels": int(head["weight"].shape[0]),
            "pooling": cfg.pooling,
            "max-length": cfg.max_length,
            "client-id": client_id,
            "round": ckpt.server_round,
            "run-dir": str(Path(run_dir).resolve()),
            "strategy": cfg.strategy,
            "metrics": ckpt.meta.get("evals", {}).get(str(client_id), {}),
        }
        (folder / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        folders.append(folder)
    return folders


def load_exported(folder: Path) -> tuple[Any, Any, dict[str, Any]]:
    """The classifier, tokenizer and ``atlas.json`` of an exported folder (PEFT's own loader for the adapter)."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModel

    from atlas_flwr.models.classifier import SequenceClassifier, load_tokenizer
    from atlas_flwr.models.registry import resolve_model

    info_path = Path(folder) / INFO_FILE
    if not info_path.is_file():
        raise AtlasError(f"{str(folder)!r} is not an exported model: it lacks {INFO_FILE} (make one with atlas-export)")
    info = json.loads(info_path.read_text(encoding="utf-8"))
    try:
        path = resolve_model(info["model"]).path
    except Exception:  # noqa: BLE001 - an alias unknown here: fall back to the path recorded at export
        path = info["model-path"]
    backbone = PeftModel.from_pretrained(AutoModel.from_pretrained(path), str(folder))
    model = SequenceClassifier(backbone, int(info["num-labels"]), str(info["pooling"]))
    model.head.load_state_dict(load_file(str(Path(folder) / HEAD_FILE)))
    return model.eval(), load_tokenizer(path), info


def predict(folder: Path, rows: Sequence[Sequence[str]], batch_size: int = 64) -> np.ndarray:
    """Logits (rows x labels) of an exported model; a row holds the task's text columns in order."""
    import torch

    model, tokenizer, info = load_exported(folder)
    outputs = []
    with torch.inference_mode():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            columns = [list(c) for c in zip(*chunk, strict=True)]
            enc = tokenizer(
                *columns, truncation=True, max_length=int(info["max-length"]), padding=True, return_tensors="pt"
            )
            logits = model(enc["input_ids"], enc["attention_mask"], enc.get("token_type_ids"))
            outputs.append(logits.float().numpy())
    return np.concatenate(outputs) if outputs else np.zeros((0, int(info["num-labels"])))


def _read_rows(file: Path, columns: Sequence[str]) -> list[list[str]]:
    """Rows of a CSV/TSV (with a header) or JSON-lines file, as the task's text columns."""
    if not file.is_file():
        raise AtlasError(f"--file {str(file)!r} not found: expected a .csv, .tsv or .jsonl file")
    text = file.read_text(encoding="utf-8")
    if file.suffix == ".jsonl":
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        records = list(csv.DictReader(text.splitlines(), delimiter="\t" if file.suffix == ".tsv" else ","))
    missing = [c for c in columns if records and c not in records[0]]
    if missing:
        raise AtlasError(f"--file {str(file)!r} lacks columns {missing}: this task reads {list(columns)}")
    return [[str(r[c]) for c in columns] for r in records]


def export_main(argv: Sequence[str] | None = None) -> int:
    """``atlas-export``: one line per exported folder; errors as one line, exit code 2."""
    parser = argparse.ArgumentParser(prog="atlas-export", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--out", type=Path, help="default: RUN_DIR/export")
    parser.add_argument("--clients", help="comma-separated client ids (default: every client)")
    args = parser.parse_args(argv)
    try:
        clients = None
        if args.clients:
            try:
                clients = [int(c) for c in args.clients.split(",")]
            except ValueError as err:
                raise AtlasError(f"--clients {args.clients!r} is invalid: expected comma-separated integers") from err
        for folder in export_run(args.run_dir, args.out, clients):
            print(folder)
    except AtlasError as err:
        print(f"atlas-export: {err}", file=sys.stderr)
        return 2
    return 0


def predict_main(argv: Sequence[str] | None = None) -> int:
    """``atlas-predict``: one line per row (label and probabilities), or a CSV with ``--out``."""
    from atlas_flwr.data import task_spec

    parser = argparse.ArgumentParser(prog="atlas-predict", description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="an exported folder (atlas-export)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", help="one input text")
    source.add_argument("--file", type=Path, help="a .csv/.tsv (header) or .jsonl file with the task's text columns")
    parser.add_argument("--pair", help="the second text of a sentence-pair task (with --text)")
    parser.add_argument("--out", type=Path, help="write predictions to this CSV instead of printing them")
    args = parser.parse_args(argv)
    try:
        info_path = args.folder / INFO_FILE
        if not info_path.is_file():
            raise AtlasError(f"{str(args.folder)!r} is not an exported model: it lacks {INFO_FILE}")
        columns = task_spec(json.loads(info_path.read_text(encoding="utf-8"))["task"]).text_columns
        if args.text is not None:
            if (args.pair is not None) != (len(columns) == 2):
                raise AtlasError(f"this task reads {list(columns)}: give --pair exactly when it has two columns")
            rows = [[args.text] + ([args.pair] if args.pair is not None else [])]
        else:
            rows = _read_rows(args.file, columns)
        logits = predict(args.folder, rows)
    except AtlasError as err:
        print(f"atlas-predict: {err}", file=sys.stderr)
        return 2
    probs = np.exp(logits - logits.max(axis=1, keepdims=True))
    probs /= probs.sum(axis=1, keepdims=True)
    lines = [[int(p.argmax()), *(f"{x:.4f}" for x in p)] for p in probs]
    if args.out is not None:
        with args.out.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["label", *(f"p{i}" for i in range(probs.shape[1]))])
            writer.writerows(lines)
        print(f"{len(lines)} predictions in {args.out}")
    else:
        for line in lines:
            print("\t".join(map(str, line)))
    return 0
