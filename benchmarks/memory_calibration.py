"""Does the memory model (``strategies.memory.predict_peak_bytes``) predict the measured peak of LoRA training?

For each configuration (model family, batch, sequence length, per-layer ranks) a FRESH Python process builds
the project's real classifier (``atlas_flwr.models.classifier.build_classifier``), runs a few steps of the
project's real training loop (``atlas_flwr.client.train.train_local``: AdamW, forward, backward, ``optimizer.step``)
on the CPU (or, with ``--device cuda``, on the GPU), and reports its peak memory; the parent compares it with the prediction.

    python benchmarks/memory_calibration.py --out benchmarks/results/memory
    python benchmarks/memory_calibration.py --table          # the markdown table of the committed CSV
    python benchmarks/memory_calibration.py --device cuda --out benchmarks/results/memory-cuda
    python benchmarks/memory_calibration.py --device cuda --out benchmarks/results/memory-cuda --rescore

``--rescore`` keeps the measurements of OUT and recomputes every prediction (and the workspace fit) with the
current ``Calibration.for_device(--device)``: how a changed model is checked against measurements that need
a machine one does not have at hand.

On CUDA (``--device cuda``) the same training loop runs with fp16 autocast and a GradScaler, as clients
with a GPU train. Measured = ``torch.cuda.max_memory_allocated()`` during the steps minus
``torch.cuda.memory_allocated()`` before the classifier is built (the runtime warmed up first, so cuBLAS
workspaces are in the baseline): live tensor bytes, allocator caching excluded, the CUDA context excluded.
The saved-tensor count then also reports the fp16 copies of weights that autocast keeps for backward
(``counted_weight_casts``), which the CPU does not have.

Measurement (CPU; ``tracemalloc`` does not see torch's allocations, so resident memory is used):

1. In the child: import torch, transformers, PEFT and the project; run one tiny forward/backward/AdamW step
   on a throwaway module so that the lazily created runtime state (thread pool, oneDNN/BLAS buffers) exists;
   load the backbone through the project's process-wide cache (``_load_backbone``: one frozen copy per
   process, shared by every client it simulates, outside one step's memory) and read all its parameters:
   they are views of the memory-mapped safetensors file, paged in (``RssFile``) only when first read, i.e.
   by the ``deepcopy`` below, which would otherwise count the cache twice; ``gc.collect()`` and
   ``malloc_trim(0)``; read ``VmRSS`` as the baseline.
2. Build the classifier (its ``deepcopy`` of the backbone is the ``frozen_weights`` term), write ``5`` to
   ``/proc/self/clear_refs`` (resets the kernel's peak-RSS counter ``VmHWM`` to the current RSS), run
   ``--steps`` training steps, read ``VmHWM``. Measured = ``VmHWM - baseline``: frozen weights, LoRA
   parameters, gradients, AdamW moments, saved activations, transient tensors and allocator slack.
3. Afterwards, one more forward under ``torch.autograd.graph.saved_tensors_hooks`` counts the bytes autograd
   keeps for backward (distinct storages, parameters excluded): a check of the ``activations`` term alone.

The child runs with one thread (``torch.set_num_threads(1)``, ``OMP_NUM_THREADS=1``) and glibc's malloc
pinned: ``MALLOC_ARENA_MAX=1`` and a fixed ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` of 128 KiB.
A fixed mmap threshold turns off glibc's dynamic threshold, which otherwise moves freed multi-MB tensors onto
the heap where they may stay resident after being freed; with it, every large tensor is its own mapping,
returned on free, so RSS follows the live bytes. ``--malloc default`` runs without these variables: glibc
then keeps freed activation memory of one step resident into the next, and the peak RSS of MiniLM at
16 x 128 was 919 MB after 1 step, 1161 MB after 3, 1108 MB after 6, against 629 MB pinned (results in
``benchmarks/results/memory/glibc-default``). The memory model predicts live tensor bytes; a client that
must stay under a budget in RSS terms needs the pinned malloc settings (or jemalloc/tcmalloc), or a margin.

The prediction uses ``ModelShape.from_hf_config`` on the model's config with the project's LoRA targets
(``atlas_flwr.models.registry.lora_targets``) and ``Calibration.for_device(--device)`` (dropout masks are fp32
tensors on the CPU, bool on CUDA). A rank-0 layer cannot be written as a ``LoraSettings.rank_pattern`` (PEFT rejects r=0):
the child adds PEFT's ``exclude_modules`` for those layers to the project's ``lora_config``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from strategies.memory import Calibration, ModelShape, TrainShape, predict_peak_bytes

THREADS = 1
STEPS = 3
MALLOC_ENV = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_THRESHOLD_": "131072",
    "MALLOC_TRIM_THRESHOLD_": "131072",
}
#: Small random-init models of two other families, saved once to a temporary directory (seeded).
RANDOM_MODELS = {
    "bert-small-random": {
        "model_type": "bert",
        "hidden_size": 256,
        "intermediate_size": 1024,
        "num_attention_heads": 4,
        "num_hidden_layers": 8,
        "vocab_size": 30522,
        "max_position_embeddings": 512,
        "type_vocab_size": 2,
    },
    "gpt2-small-random": {
        "model_type": "gpt2",
        "n_embd": 256,
        "n_head": 4,
        "n_layer": 6,
        "vocab_size": 50257,
        "n_positions": 512,
        "pad_token_id": 0,
    },  # Qwen2.5-0.5B's shape (Qwen/Qwen2.5-0.5B config.json), random init: the model of the T4 table (issue 18).
    # Saved only when a selected config uses it (2 GB in fp32).
    "qwen2.5-0.5b-random": {
        "model_type": "qwen2",
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "vocab_size": 151936,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-06,
        "hidden_act": "silu",
        "tie_word_embeddings": True,
        "pad_token_id": 0,
    },
}
#: name, model, batch, seq_len, per-layer ranks[, rank of the frozen adapters on the rank-0 layers].
CONFIGS = [
    ("minilm-b8-s64-r8", "minilm-l6", 8, 64, [8] * 6),
    ("minilm-b16-s128-r8", "minilm-l6", 16, 128, [8] * 6),
    ("minilm-b32-s128-r8", "minilm-l6", 32, 128, [8] * 6),
    ("minilm-b16-s128-hetero", "minilm-l6", 16, 128, [0, 0, 4, 8, 16, 8]),
    ("minilm-b32-s64-hetero", "minilm-l6", 32, 64, [0, 16, 0, 8, 0, 4]),
    ("bert8L-b16-s128-r8", "bert-small-random", 16, 128, [8] * 8),
    ("gpt2-6L-b16-s128-hetero", "gpt2-small-random", 16, 128, [0, 0, 8, 8, 16, 16]),
    # Added after the CUDA calibration was fitted: minilm-b16-s256-r4 was measured on CUDA
    # (results/memory-cuda/rerun.txt), neither on the CPU yet:
    ("minilm-b16-s256-r4", "minilm-l6", 16, 256, [4] * 6),
    ("gpt2-6L-b8-s256-r8", "gpt2-small-random", 8, 256, [8] * 6),
    # frozen-layers = use (issue 17): the layers at rank 0 hold a frozen rank-8 adapter that the forward pass
    # uses and nothing trains. Each beside the same ranks without frozen adapters.
    ("minilm-b16-s64-top1", "minilm-l6", 16, 64, [0, 0, 0, 0, 0, 8]),
    ("minilm-b16-s64-top1-frozen8", "minilm-l6", 16, 64, [0, 0, 0, 0, 0, 8], 8),
    ("minilm-b16-s64-gap", "minilm-l6", 16, 64, [0, 8, 0, 0, 8, 8]),
    ("minilm-b16-s64-gap-frozen8", "minilm-l6", 16, 64, [0, 8, 0, 0, 8, 8], 8),
    # How the base is held (issue 18): gradient checkpointing and bitsandbytes 8/4-bit linear layers, each
    # beside minilm-b16-s128-r8 (results in benchmarks/results/memory-base-options; the fit is not redone).
    ("minilm-b16-s128-r8-ckpt", "minilm-l6", 16, 128, [8] * 6, 0, {"checkpointing": True}),
    ("minilm-b16-s128-r8-8bit", "minilm-l6", 16, 128, [8] * 6, 0, {"quantization": "8bit"}),
    ("minilm-b16-s128-r8-4bit", "minilm-l6", 16, 128, [8] * 6, 0, {"quantization": "4bit"}),
    ("minilm-b16-s128-r8-4bit-ckpt", "minilm-l6", 16, 128, [8] * 6, 0, {"quantization": "4bit", "checkpointing": True}),
    ("minilm-b16-s128-top2-ckpt", "minilm-l6", 16, 128, [0, 0, 0, 0, 8, 8], 0, {"checkpointing": True}),
    ("qwen05b-b2-s128-r8", "qwen2.5-0.5b-random", 2, 128, [8] * 24),
    ("qwen05b-b2-s128-r8-ckpt", "qwen2.5-0.5b-random", 2, 128, [8] * 24, 0, {"checkpointing": True}),
    ("qwen05b-b2-s128-r8-4bit", "qwen2.5-0.5b-random", 2, 128, [8] * 24, 0, {"quantization": "4bit"}),
]
#: Configs whose measurements fit the two workspace constants (see ``fit_workspace``); the rest are held out.
FIT = ("minilm-b8-s64-r8", "minilm-b16-s128-r8", "minilm-b32-s128-r8")
FIELDS = [
    "config",
    "role",
    "family",
    "model",
    "batch",
    "seq_len",
    "ranks",
    "frozen_rank",
    "quantization",
    "checkpointing",
    "pred_frozen_weights",
    "pred_lora_params",
    "pred_lora_grads",
    "pred_optimizer_state",
    "pred_activations",
    "pred_weight_casts",
    "pred_workspace",
    "pred_layer_activations",
    "predicted",
    "measured",
    "rel_error",
    "counted_activations",
    "activations_rel_error",
    "counted_weight_casts",
    "measured_after_build",
    "method",
    "device",
    "malloc",
    "torch",
    "transformers",
    "peft",
    "threads",
    "steps",
    "seconds",
]
METHOD = "VmHWM - VmRSS baseline (clear_refs=5 after build), fresh process"
METHOD_CUDA = "torch.cuda.max_memory_allocated - memory_allocated baseline (before build), fresh process"


# --------------------------------------------------------------------------------------------- child process
def _proc_kib(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _autocast(torch, device):
    """The training loop's autocast: fp16 on CUDA, none on the CPU (``atlas_flwr.client.train``)."""
    import contextlib

    return torch.autocast("cuda", dtype=torch.float16) if device.type == "cuda" else contextlib.nullcontext()


def _warm_up_runtime(torch, device) -> None:
    """One tiny training step so that the runtime's lazy state exists before the baseline is read."""
    layer = torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.1, batch_first=True).to(device)
    lora = torch.nn.Linear(32, 4).to(device)
    opt = torch.optim.AdamW(lora.parameters())
    x = torch.randn(2, 16, 32, device=device)
    with _autocast(torch, device):
        loss = layer(x + lora(x).sum(-1, keepdim=True)).sum() + torch.nn.functional.gelu(x).sum()
    loss.float().backward()
    opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()


def _layer_key(family: str) -> str:
    """The module-path part before a block's index: GPT-2 ``h.3``, LLaMA/Qwen2 ``layers.3``, BERT ``layer.3``."""
    return {"gpt2": "h", "qwen2": "layers", "llama": "layers"}.get(family, "layer")


def _exclusion_regex(family: str, ranks: list[int], targets: list[str]) -> str | None:
    zero = [str(i) for i, r in enumerate(ranks) if r == 0]
    if not zero:
        return None
    layer = r"h\.({})\.attn" if family == "gpt2" else _layer_key(family) + r"\.({})\..*"
    return rf".*{layer.format('|'.join(zero))}\.({'|'.join(targets)})$"


def _rank_pattern(family: str, ranks: list[int], targets: list[str]) -> dict[str, int]:
    prefixes = {"gpt2": "h.{}.attn.{}", "qwen2": "layers.{}.self_attn.{}", "llama": "layers.{}.self_attn.{}"}
    prefix = prefixes.get(family, "layer.{}.attention.self.{}")
    return {prefix.format(i, t): r for i, r in enumerate(ranks) if r for t in targets}


def child(spec: dict) -> dict:
    """Measure one configuration in this (fresh) process."""
    import ctypes
    import gc
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    torch.set_num_threads(spec["threads"])
    from atlas_flwr.client.train import train_local
    from atlas_flwr.common.quiet import quiet_libraries
    from atlas_flwr.models import classifier
    from atlas_flwr.models.registry import resolve_model

    quiet_libraries()
    device = torch.device(spec.get("device", "cpu"))
    cuda = device.type == "cuda"
    _warm_up_runtime(torch, device)
    source = resolve_model(spec["path"])
    quantization, checkpointing = spec.get("quantization", "none"), spec.get("checkpointing", False)
    dtype = spec.get("base_dtype", "fp32")
    # the process-wide frozen copy (see module docstring)
    cached = classifier._load_backbone(source.path, dtype, quantization)
    with torch.no_grad():
        for p in cached.parameters():  # page the memory-mapped safetensors file in (it counts as RssFile)
            p.sum()
    if quantization != "none":
        # bitsandbytes loads its kernels and their buffers on the first k-bit step (about 100 MB of RSS, once
        # per process): one tiny step of a throwaway copy moves that below the baseline, as the warm-up above
        # does for torch's runtime.
        probe = classifier.build_classifier(
            spec["path"],
            2,
            classifier.LoraSettings(rank=1),
            base=classifier.BaseSettings(dtype=dtype, quantization=quantization),
        )
        probe.train()
        ids = torch.ones(1, 8, dtype=torch.long)
        probe(input_ids=ids, attention_mask=ids).sum().backward()
        del probe
    batch, seq, ranks = spec["batch"], spec["seq_len"], spec["ranks"]
    frozen_rank = spec.get("frozen_rank", 0)
    held = [r or frozen_rank for r in ranks]
    exclude = _exclusion_regex(source.family, held, source.lora_targets)
    if exclude:
        plain = classifier.lora_config

        def lora_config(src, lora):
            cfg = plain(src, lora)
            cfg.exclude_modules = exclude
            return cfg

        classifier.lora_config = lora_config
    first = next(r for r in held if r)
    settings = classifier.LoraSettings(rank=first, rank_pattern=_rank_pattern(source.family, held, source.lora_targets))
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(spec["steps"]):
        item = {
            "input_ids": torch.randint(1000, 5000, (batch, seq), generator=gen),
            "attention_mask": torch.ones(batch, seq, dtype=torch.long),
            "labels": torch.randint(0, 2, (batch,), generator=gen),
        }
        if source.family == "bert":
            item["token_type_ids"] = torch.zeros(batch, seq, dtype=torch.long)
        batches.append(item)
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        baseline = torch.cuda.memory_allocated()
    else:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        baseline = _proc_kib("VmRSS")

    base = classifier.BaseSettings(dtype=dtype, quantization=quantization, gradient_checkpointing=checkpointing)
    model = classifier.build_classifier(spec["path"], 2, settings, base=base)
    adapted = sorted({int(n.split(".")[n.split(".").index(_layer_key(source.family)) + 1]) for n, _ in _lora(model)})
    expected = [i for i, r in enumerate(held) if r]
    if adapted != expected:
        raise RuntimeError(f"adapted layers {adapted} != expected {expected}")
    layer_key = _layer_key(source.family)
    for name, param in model.named_parameters():  # as run_train freezes the modules it is told to
        parts = name.split(".")
        if ".lora_" in name and not ranks[int(parts[parts.index(layer_key) + 1])]:
            param.requires_grad_(False)
    if cuda:
        model.to(device)
        torch.cuda.synchronize()
        after_build = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        after_build = _proc_kib("VmRSS")
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    start = time.perf_counter()
    train_local(model, batches, epochs=1, lr=1e-4, weight_decay=0.01, device=device)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if cuda else _proc_kib("VmHWM")
    inputs = {k: v for k, v in batches[0].items() if k != "labels"}
    counted, casts = count_saved_activation_bytes(model, inputs, device)
    return {
        "measured": peak - baseline,
        "measured_after_build": after_build - baseline,
        "counted_activations": counted,
        "counted_weight_casts": casts,
        "seconds": round(seconds, 2),
    }


def _lora(model):
    return [(n, p) for n, p in model.named_parameters() if "lora_A" in n]


def count_saved_activation_bytes(model, inputs: dict, device=None) -> tuple[int, int]:
    """Bytes autograd keeps for backward in one training-mode forward (under the training loop's autocast):
    distinct storages, parameters excluded; and, apart, the low-precision copies of weights autocast made."""
    import torch

    device = device or torch.device("cpu")
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    # Only projection weights are cast by autocast (embedding tables are not): nn.Linear, GPT-2's Conv1D.
    shapes = {
        tuple(m.weight.shape)
        for m in model.modules()
        if type(m).__name__ in ("Linear", "Conv1D") and getattr(m, "weight", None) is not None
    }
    seen: dict[int, int] = {}
    casts: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() in params:
            return t
        # autocast's fp16 copy of a weight: a parameter's shape in half precision, filling its storage
        is_cast = t.dtype == torch.float16 and tuple(t.shape) in shapes and storage.nbytes() == 2 * t.numel()
        (casts if is_cast else seen).setdefault(storage.data_ptr(), storage.nbytes())
        return t

    model.train()
    inputs = {k: v.to(device) for k, v in inputs.items()}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _autocast(torch, device):
        out = model(**inputs)
    del out
    return sum(seen.values()), sum(casts.values())


# --------------------------------------------------------------------------------------------- parent process
def prepare_models(tmp: Path, names: set[str] | None = None) -> dict[str, str]:
    """Model name -> path for build_classifier (random-init models saved to ``tmp``; only ``names`` if given)."""
    import torch
    from transformers import AutoConfig, AutoModel

    paths = {"minilm-l6": "minilm-l6"}
    for name, cfg in RANDOM_MODELS.items():
        if names is not None and name not in names:
            continue
        cfg = dict(cfg)
        config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
        torch.manual_seed(0)
        AutoModel.from_config(config).save_pretrained(tmp / name)
        paths[name] = str(tmp / name)
    return paths


def predict(
    path: str,
    batch: int,
    seq: int,
    ranks: list[int],
    device: str = "cpu",
    frozen_rank: int = 0,
    quantization: str = "none",
    checkpointing: bool = False,
) -> tuple[str, dict[str, int], int]:
    """Family, predicted breakdown, and the bytes one layer stores (the unit of ``workspace_layers``)."""
    from transformers import AutoConfig

    from atlas_flwr.models.registry import resolve_model

    source = resolve_model(path)
    config = AutoConfig.from_pretrained(source.path).to_dict()
    shape = ModelShape.from_hf_config(config, source.lora_targets)
    cal = Calibration.for_device(device)
    train = TrainShape(batch, seq, quantization=quantization, checkpointing=checkpointing)
    unit = dataclasses.replace(cal, workspace_layers=1.0, workspace_bytes=0.0)
    layer = predict_peak_bytes(shape, TrainShape(batch, seq), ranks, "adamw", unit)["workspace"]
    return source.family, predict_peak_bytes(shape, train, ranks, "adamw", cal, frozen_rank), layer


def fit_workspace(rows: list[dict]) -> dict:
    """Least squares of ``measured - (predicted - workspace) = workspace_bytes + workspace_layers * layer``."""
    import numpy as np

    fit = [r for r in rows if r["role"] == "fit"]
    if len(fit) < 2:
        return {}
    x = np.array([[1.0, float(r["pred_layer_activations"])] for r in fit])
    y = np.array([float(r["measured"]) - float(r["predicted"]) + float(r["pred_workspace"]) for r in fit])
    (fixed, layers), *_ = np.linalg.lstsq(x, y, rcond=None)
    return {"configs": [r["config"] for r in fit], "workspace_bytes": float(fixed), "workspace_layers": float(layers)}


def run_config(
    name: str,
    model: str,
    path: str,
    batch: int,
    seq: int,
    ranks: list[int],
    args,
    frozen_rank: int = 0,
    options: dict | None = None,
) -> dict:
    spec = {"path": path, "batch": batch, "seq_len": seq, "ranks": ranks, "steps": args.steps, "threads": args.threads}
    spec["frozen_rank"] = frozen_rank
    spec |= options or {}
    spec["device"] = args.device
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    if args.malloc == "pinned":
        env.update(MALLOC_ENV)
    else:
        for key in MALLOC_ENV:
            env.pop(key, None)
    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)], env=env, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{name}: child failed\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    import peft
    import torch
    import transformers

    measurement = {
        "config": name,
        "role": "fit" if name in FIT else "held-out",
        "model": model,
        "batch": batch,
        "seq_len": seq,
        "ranks": " ".join(map(str, ranks)),
        "frozen_rank": frozen_rank,
        "quantization": spec.get("quantization", "none"),
        "checkpointing": spec.get("checkpointing", False),
        "measured": result["measured"],
        "counted_activations": result["counted_activations"],
        "counted_weight_casts": result["counted_weight_casts"],
        "measured_after_build": result["measured_after_build"],
        "method": METHOD_CUDA if args.device == "cuda" else METHOD,
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        "malloc": "n/a (CUDA allocator)"
        if args.device == "cuda"
        else "pinned: " + " ".join(f"{k}={v}" for k, v in MALLOC_ENV.items())
        if args.malloc == "pinned"
        else "glibc default",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "threads": args.threads,
        "steps": args.steps,
        "seconds": result["seconds"],
    }
    return _with_prediction(measurement, path, args.device)


def _with_prediction(row: dict, path: str, device: str) -> dict:
    """``row`` (a measurement) with the current model's prediction and errors."""
    ranks = [int(r) for r in str(row["ranks"]).split()]
    frozen_rank = int(row.get("frozen_rank") or 0)  # absent from results measured before the column
    quantization = row.get("quantization") or "none"
    checkpointing = str(row.get("checkpointing")) == "True"
    family, pred, layer = predict(
        path, int(row["batch"]), int(row["seq_len"]), ranks, device, frozen_rank, quantization, checkpointing
    )
    measured, counted = int(row["measured"]), int(row["counted_activations"])
    return {
        **row,
        "family": family,
        **{f"pred_{k}": v for k, v in pred.items() if k != "total"},
        "pred_layer_activations": layer,
        "predicted": pred["total"],
        "rel_error": round((pred["total"] - measured) / measured, 4),
        "activations_rel_error": round((pred["activations"] - counted) / counted, 4),
    }


def write_results(out: Path, meta: dict) -> None:
    """``memory.json`` (everything) and ``memory.csv`` (the rows) in ``out``; print the table and the fit."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory.json").write_text(json.dumps(meta, indent=2) + "\n")
    with (out / "memory.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(meta["rows"])
    print(markdown(meta["rows"]))
    print("workspace fit:", json.dumps(meta["workspace_fit"]))


def rescore(args) -> None:
    """Recompute OUT's predictions and workspace fit with the current calibration; measurements unchanged."""
    meta = json.loads((args.out / "memory.json").read_text())
    measured_on = "cuda" if meta.get("method") == METHOD_CUDA else "cpu"
    if measured_on != args.device:
        raise SystemExit(f"{args.out} was measured on {measured_on}: rescore it with --device {measured_on}")
    with tempfile.TemporaryDirectory() as tmp:
        paths = prepare_models(Path(tmp), {row["model"] for row in meta["rows"]})
        rows = [_with_prediction(row, paths[row["model"]], args.device) for row in meta["rows"]]
    meta |= {
        "rows": rows,
        "calibration": dataclasses.asdict(Calibration.for_device(args.device)),
        "workspace_fit": fit_workspace(rows) if meta.get("workspace_fit") else {},
        "rescored": "python benchmarks/memory_calibration.py " + " ".join(sys.argv[1:]),
    }
    write_results(args.out, meta)


def markdown(rows: list[dict]) -> str:
    mb = 1e6
    lines = [
        (
            "| config | role | family | batch | seq | ranks | predicted MB | measured MB | error "
            "| pred. act. MB | counted act. MB | act. error |"
        ),
        "|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['role']} | {r['family']} | {r['batch']} | {r['seq_len']} | {r['ranks']} "
            f"| {float(r['predicted']) / mb:.1f} | {float(r['measured']) / mb:.1f} | {float(r['rel_error']):+.1%} "
            f"| {float(r['pred_activations']) / mb:.1f} | {float(r['counted_activations']) / mb:.1f} "
            f"| {float(r['activations_rel_error']):+.1%} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/memory")
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--threads", type=int, default=THREADS)
    parser.add_argument("--malloc", choices=("pinned", "default"), default="pinned")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where the steps run (see above)")
    parser.add_argument("--only", nargs="*", help="config names to run (default: all)")
    parser.add_argument("--table", action="store_true", help="print the markdown table of OUT/memory.csv")
    parser.add_argument("--rescore", action="store_true", help="new predictions for the measurements in OUT")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    if args.table:
        with (args.out / "memory.csv").open() as fh:
            print(markdown(list(csv.DictReader(fh))))
        return
    if args.rescore:
        rescore(args)
        return
    configs = [c for c in CONFIGS if not args.only or c[0] in args.only]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        paths = prepare_models(Path(tmp), {c[1] for c in configs})
        for name, model, batch, seq, ranks, *extra in configs:
            row = run_config(name, model, paths[model], batch, seq, ranks, args, *extra)
            print(
                f"{name}: predicted {row['predicted'] / 1e6:.1f} MB, measured {row['measured'] / 1e6:.1f} MB, "
                f"error {row['rel_error']:+.1%}",
                flush=True,
            )
            rows.append(row)
    meta = {
        "command": "python benchmarks/memory_calibration.py " + " ".join(sys.argv[1:]),
        "method": METHOD_CUDA if args.device == "cuda" else METHOD,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "calibration": dataclasses.asdict(Calibration.for_device(args.device)),
        # RSS is live bytes only when malloc is pinned; CUDA's allocated bytes always are
        "workspace_fit": fit_workspace(rows) if args.malloc == "pinned" or args.device == "cuda" else {},
        "random_models": RANDOM_MODELS,
        "rows": rows,
    }
    write_results(args.out, meta)


if __name__ == "__main__":
    main()
