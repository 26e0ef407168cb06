"""Training throughput: a client's ``run_train`` against a textbook PyTorch/PEFT LoRA loop on the same rows.

    python benchmarks/throughput.py --out benchmarks/results/throughput            # about 4 min on 2 cores
    python benchmarks/throughput.py --out DIR --runs benchmarks/results/protocol-v2/*-s42

Both sides train MiniLM-L6 with LoRA on the query and value projections, mean pooling and a linear head,
AdamW, batch 16, max length 64, on one client's rows of each task (the rows ``client_partition`` gives
client 0 of 2, 768 of them), for one epoch after a warm-up of 4 steps. The textbook loop builds everything
from ``transformers`` and ``peft`` directly and pads each batch to its longest row; ``run_train`` is the
ClientApp's training path (bucketing by length, head learning rate, the seeded loader). Model loading and
tokenization are outside the timed part on both sides.

``--runs`` adds, for finished run directories, training samples per second per round and per client
(see :func:`run_rows`).
Writes ``throughput.json`` and ``throughput.csv``.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TASKS = ("sst2", "mrpc", "cola", "qnli")
ROWS, BATCH, MAX_LENGTH, WARMUP = 768, 16, 64, 4


def textbook_samples_per_second(task: str, rows, seed: int) -> float:
    """One epoch of a plain LoRA loop over ``rows`` (a datasets.Dataset of GLUE rows)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel, AutoTokenizer

    from atlas_flwr.data import task_spec
    from atlas_flwr.models.registry import resolve_model

    spec = task_spec(task)
    path = resolve_model("minilm-l6").path
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(seed)
    encoder = get_peft_model(
        AutoModel.from_pretrained(path),
        LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["query", "value"]),
    )
    head = torch.nn.Linear(encoder.config.hidden_size, spec.num_labels)
    params = [p for p in encoder.parameters() if p.requires_grad] + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    columns = [rows[c] for c in spec.text_columns]
    texts = list(zip(*columns, strict=True)) if len(columns) == 2 else columns[0]
    labels = torch.tensor(rows["label"])
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed)).tolist()
    batches = [order[i : i + BATCH] for i in range(0, len(order), BATCH)]

    def step(batch: list[int]) -> None:
        chosen = [texts[i] for i in batch]
        if isinstance(chosen[0], tuple):
            enc = tokenizer(
                [a for a, _ in chosen], [b for _, b in chosen], truncation=True, max_length=MAX_LENGTH,
                padding=True, return_tensors="pt",
            )  # fmt: skip
        else:
            enc = tokenizer(chosen, truncation=True, max_length=MAX_LENGTH, padding=True, return_tensors="pt")
        hidden = encoder(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        logits = head((hidden * mask).sum(1) / mask.sum(1))
        loss = torch.nn.functional.cross_entropy(logits, labels[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    encoder.train()
    for batch in batches[:WARMUP]:
        step(batch)
    start = time.perf_counter()
    for batch in batches:
        step(batch)
    return len(order) / (time.perf_counter() - start)


def ours_samples_per_second(task: str, data_dir: str, seed: int) -> float:
    """One epoch of the ClientApp's ``run_train`` for client 0 of a 2-client task (after a warm-up call)."""
    from atlas_flwr.client.local import initial_state, run_train
    from atlas_flwr.common.config import Config
    from atlas_flwr.common.records import to_numpy
    from atlas_tools.cli import resolve_run_config

    overrides = [
        f'tasks="{task}"', "clients-per-task=2", f"max-samples-per-client={ROWS}", f"seed={seed}",
        f'data-dir="{data_dir}"', f"batch-size={BATCH}", f"max-length={MAX_LENGTH}", "local-epochs=1",
    ]  # fmt: skip
    cfg = Config.from_run_config(resolve_run_config(ROOT, None, overrides))
    adapter, head = (to_numpy(s) for s in initial_state(cfg))
    run_train(cfg, 0, 1, adapter, head)  # warm-up: loads, partitions and tokenizes (cached per process)
    _, _, result = run_train(cfg, 0, 2, adapter, head)
    return result.num_examples / result.seconds


def run_rows(run_dir: Path) -> list[dict]:
    """Training samples per second of a finished run: per round and, where recorded, per client (last round).

    Per round: ``num-examples`` over the clients' own training seconds (``client-train-seconds``) and over
    the train phase's wall time (``train-seconds``: messages and Ray included). Per client: its rows times
    ``local-epochs`` over its last ``train-seconds``.
    """
    out = []
    epochs = json.loads((run_dir / "config.json").read_text())["run-config"]["local-epochs"]
    with (run_dir / "rounds.csv").open() as fh:
        for row in csv.DictReader(fh):
            examples = float(row["num-examples"])
            out.append(
                {
                    "run": run_dir.name,
                    "round": int(row["round"]),
                    "client": "all",
                    "samples-per-second": examples / float(row["client-train-seconds"]),
                    "samples-per-second-wall": examples / float(row["train-seconds"]),
                }
            )
    with (run_dir / "clients.csv").open() as fh:
        for row in csv.DictReader(fh):
            seconds = float(row.get("train-seconds") or "nan")
            if seconds > 0:
                out.append(
                    {
                        "run": run_dir.name,
                        "round": "last",
                        "client": int(row["client-id"]),
                        "samples-per-second": float(row["num-train"]) * epochs / seconds,
                        "samples-per-second-wall": float("nan"),
                    }
                )
    return out


def main() -> None:
    """Measure both loops per task, add the runs' rates, write JSON and CSV."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data" / "glue"))
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--runs", type=Path, nargs="*", default=[])
    args = parser.parse_args()
    import torch

    from atlas_flwr.data.glue import client_partition

    rows = []
    for task in args.tasks.split(","):
        part = client_partition(
            task, 0, 2, data_dir=args.data_dir, partitioner="iid", alpha=0.5, seed=args.seed, max_samples=ROWS
        )
        textbook = textbook_samples_per_second(task, part, args.seed)
        ours = ours_samples_per_second(task, args.data_dir, args.seed)
        rows.append(
            {"task": task, "rows": len(part), "textbook": textbook, "run_train": ours, "ratio": ours / textbook}
        )
        print(f"{task}: textbook {textbook:.1f} samples/s, run_train {ours:.1f} samples/s ({ours / textbook:.2f}x)")
    result = {
        "machine": {"platform": platform.platform(), "cpus": torch.get_num_threads(), "torch": torch.__version__},
        "setting": {"rows": ROWS, "batch": BATCH, "max-length": MAX_LENGTH, "warmup-steps": WARMUP, "seed": args.seed},
        "loops": rows,
        "runs": [r for d in args.runs for r in run_rows(d)],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "throughput.json").write_text(json.dumps(result, indent=2) + "\n")
    with (args.out / "throughput.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


if __name__ == "__main__":
    main()
