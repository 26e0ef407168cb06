"""Split learning at every cut of MiniLM-L6: client memory, bytes per round, messaging overhead against compute.

    python benchmarks/split_cuts.py --out benchmarks/results/split          # measure (about 15 min on 2 cores)
    python benchmarks/split_cuts.py --table benchmarks/results/split        # the markdown table of the results
    python benchmarks/split_cuts.py --table benchmarks/results/split --readme docs/split-learning.md   # ... into the docs

Setting: batch 16, every batch padded to 128 tokens (``padding = "max-length"``), LoRA rank 8 on query/value,
AdamW; the issue's reference point is cut 2.

1. **Client memory**, measured: for each cut 1..5 a fresh process builds the real client of
   ``atlas_flwr.client.split_client`` (the classifier, ``SplitClassifier``, ``drop_top``, ``ClientSide``), runs
   ``--steps`` steps (bottom forward, backward of a gradient of the activations' shape, AdamW), and reports its
   peak resident memory above the baseline (``VmHWM`` after ``clear_refs``, with the runtime warmed up and the
   process-wide frozen backbone cached first, and glibc malloc pinned; the method of
   ``benchmarks/memory_calibration.py``). ``none`` is a no-split client training the whole model the same way
   (``atlas_flwr.client.train.train_local``). Each is compared with the memory model's prediction
   (``split_client_peak_bytes`` / ``predict_peak_bytes``).
2. **Messages**, under ``flwr run`` (``atlas-run``, simulation engine): one SST-2 client, 160 rows (10 steps), 2
   rounds, for each cut and once without split (federated LoRA). From round 2 (warm workers) of
   ``rounds.json``: bytes by kind; per step the round trip (``split-exchange-seconds``), the client's own
   compute inside it (``split-client-seconds``, measured by the client), the server's compute
   (``split-server-seconds``), and the overhead = round trip - client compute, as a share of the step's compute
   (client + server).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

BATCH, SEQ, RANK, MODEL = 16, 128, 8, "minilm-l6"
PINNED_MALLOC = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def child(cut: int, steps: int) -> dict:
    """Peak memory of ``steps`` client steps at ``cut`` (0: no split), in this fresh process."""
    import ctypes
    import gc

    import torch

    torch.set_num_threads(1)
    from memory_calibration import _proc_kib, _warm_up_runtime

    from atlas_flwr.client.train import train_local
    from atlas_flwr.common.quiet import quiet_libraries
    from atlas_flwr.common.split_train import ClientSide
    from atlas_flwr.models import classifier
    from atlas_flwr.models.registry import resolve_model
    from atlas_flwr.models.split import SplitClassifier

    quiet_libraries()
    _warm_up_runtime(torch)
    source = resolve_model(MODEL)
    cached = classifier._load_backbone(source.path)
    with torch.no_grad():
        for p in cached.parameters():
            p.sum()
    gen = torch.Generator().manual_seed(0)
    batches = [
        {
            "input_ids": torch.randint(1000, 5000, (BATCH, SEQ), generator=gen),
            "attention_mask": torch.ones(BATCH, SEQ, dtype=torch.long),
            "token_type_ids": torch.zeros(BATCH, SEQ, dtype=torch.long),
            "labels": torch.randint(0, 2, (BATCH,), generator=gen),
        }
        for _ in range(steps)
    ]
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    baseline = _proc_kib("VmRSS")
    model = classifier.build_classifier(MODEL, 2, classifier.LoraSettings(rank=RANK))
    if cut:
        split = SplitClassifier(model, source.family, cut)
        split.drop_top()
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        client = ClientSide(split, lr=1e-3, weight_decay=0.01)
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    start = time.perf_counter()
    if cut:
        for i, batch in enumerate(batches):
            activations = client.forward(batch, seed=i)
            client.backward(torch.randn(activations.shape, generator=gen) * 1e-3)
    else:
        train_local(model, batches, epochs=1, lr=1e-3, weight_decay=0.01, device=torch.device("cpu"))
    return {"measured": _proc_kib("VmHWM") - baseline, "seconds": time.perf_counter() - start}


def predicted(cut: int) -> int:
    from transformers import AutoConfig

    from atlas_flwr.models.registry import resolve_model
    from strategies.memory import Calibration, ModelShape, TrainShape, predict_peak_bytes
    from strategies.split_cut import split_client_peak_bytes

    source = resolve_model(MODEL)
    shape = ModelShape.from_hf_config(AutoConfig.from_pretrained(source.path).to_dict(), source.lora_targets)
    train, cal, ranks = TrainShape(BATCH, SEQ), Calibration.for_device("cpu"), [RANK] * shape.num_layers
    if cut:
        return split_client_peak_bytes(shape, train, ranks, cut, calibration=cal)["total"]
    return predict_peak_bytes(shape, train, ranks, calibration=cal)["total"]


def measure_memory(cut: int, steps: int) -> dict:
    env = {**os.environ, **PINNED_MALLOC, "OMP_NUM_THREADS": "1"}
    code = f"import json, split_cuts; print(json.dumps(split_cuts.child({cut}, {steps})))"
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT / "benchmarks", env=env, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"memory child for cut {cut} failed: {result.stderr[-1500:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_messages(cut: int, out: Path) -> dict:
    """One atlas-run with ``split = cut`` (0: none); round 2's numbers."""
    name = f"cut-{cut}" if cut else "no-split"
    sets = {
        "strategy": '"fedavg"',
        "tasks": '"sst2"',
        "clients-per-task": "1",
        "max-samples-per-client": "160",
        "max-eval-samples": "64",
        "num-server-rounds": "2",
        "batch-size": str(BATCH),
        "max-length": str(SEQ),
        "padding": '"max-length"',
        "group-by-length": "false",
        "split": f'"{cut}"' if cut else '"none"',
        "output-dir": json.dumps(str(out / "runs")),
        "run-name": json.dumps(name),
    }
    args = [str(Path(sys.executable).with_name("atlas-run"))]
    for key, value in sets.items():
        args += ["--set", f"{key}={value}"]
    subprocess.run(["rm", "-rf", str(out / "runs" / name)], check=True)
    result = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"atlas-run for {name} failed: {result.stdout[-1500:]} {result.stderr[-800:]}")
    row = json.loads((out / "runs" / name / "rounds.json").read_text())[-1]
    keep = {"round", "bytes-sent", "bytes-received", "train-seconds", "round-seconds", "sst2-accuracy"}
    return {k: v for k, v in row.items() if k in keep or k.startswith("split-")}


def summarize(cut: int, memory: dict, messages: dict) -> dict:
    row: dict = {"cut": cut or "none", "client-peak-measured-mb": memory["measured"] / 1e6}
    row["client-peak-predicted-mb"] = predicted(cut) / 1e6
    row["bytes-per-round-mb"] = (messages["bytes-sent"] + messages["bytes-received"]) / 1e6
    if cut:
        steps = messages["split-steps"]
        compute = (messages["split-client-seconds"] + messages["split-server-seconds"]) / steps
        overhead = messages["split-overhead-seconds"] / steps
        row |= {
            "activations-up-mb": messages.get("split-activations-up-bytes", 0.0) / 1e6,
            "gradients-down-mb": messages.get("split-gradients-down-bytes", 0.0) / 1e6,
            "adapters-mb": (
                messages.get("split-adapters-up-bytes", 0.0) + messages.get("split-adapters-down-bytes", 0.0)
            )
            / 1e6,
            "steps": steps,
            "compute-per-step-s": compute,
            "overhead-per-step-s": overhead,
            "overhead-share": overhead / compute,
        }
    else:
        row["train-seconds"] = messages["train-seconds"]
    return row


def table(rows: list[dict]) -> str:
    none = next(r for r in rows if r["cut"] == "none")
    lines = [
        (
            "| cut | client peak measured (MB) | predicted (MB) | vs no-split client | MB per round "
            "(activations up / gradients down / adapters) | compute per step (s) | overhead per step (s) "
            "| overhead share |"
        ),
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["cut"] == "none":
            lines.append(
                f"| none (federated LoRA) | {r['client-peak-measured-mb']:.0f} | {r['client-peak-predicted-mb']:.0f}"
                f" | 1.00 | {r['bytes-per-round-mb']:.2f} (adapters only) | – | – | – |"
            )
            continue
        lines.append(
            f"| {r['cut']} | {r['client-peak-measured-mb']:.0f} | {r['client-peak-predicted-mb']:.0f} | "
            f"{r['client-peak-measured-mb'] / none['client-peak-measured-mb']:.2f} | {r['bytes-per-round-mb']:.2f} "
            f"({r['activations-up-mb']:.2f} / {r['gradients-down-mb']:.2f} / {r['adapters-mb']:.2f}) | "
            f"{r['compute-per-step-s']:.3f} | {r['overhead-per-step-s']:.3f} | {100 * r['overhead-share']:.0f}% |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "split")
    parser.add_argument("--steps", type=int, default=3, help="client steps per memory measurement")
    parser.add_argument("--cuts", default="0,1,2,3,4,5", help="0 = no split")
    parser.add_argument("--table", type=Path, help="print the table of a results folder and exit")
    parser.add_argument("--readme", type=Path, help="with --table: write it between the file's split-cuts markers")
    args = parser.parse_args()
    if args.table:
        text = table(json.loads((args.table / "split.json").read_text())["rows"])
        print(text)
        if args.readme:
            from atlas_tools.report import write_sections

            write_sections(args.readme, {"split-cuts": text})
        return
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for cut in (int(c) for c in args.cuts.split(",")):
        memory = measure_memory(cut, args.steps)
        messages = run_messages(cut, args.out)
        rows.append(summarize(cut, memory, messages))
        print(json.dumps(rows[-1]), flush=True)
    setting = {"model": MODEL, "batch": BATCH, "seq": SEQ, "rank": RANK, "memory-steps": args.steps}
    (args.out / "split.json").write_text(json.dumps({"setting": setting, "rows": rows}, indent=2) + "\n")
    with (args.out / "split.csv").open("w", newline="") as fh:
        columns = list(dict.fromkeys(k for r in rows for k in r))
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    print(table(rows))


if __name__ == "__main__":
    main()
