"""Why the EuroSAT fp16 run waits: one training step of the CNN in fp32 against bf16 autocast on this CPU.

    python benchmarks/cpu_bf16.py        # -> benchmarks/results/cpu_bf16/cpu_bf16.json (about 20 s)

On a CPU without native bf16 (no AVX512-BF16 or AMX), autocast emulates bf16 and a step is several times
slower, so ``precision = "fp16"`` (bf16 autocast on CPU) is for GPUs or bf16-capable CPUs.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from atlas_flwr.eurosat.model import build_model
from atlas_flwr.eurosat.train import autocast_for

OUT = Path(__file__).resolve().parent / "results" / "cpu_bf16"


def step_ms(precision: str, steps: int = 10, batch: int = 32) -> float:
    """Median milliseconds of one SGD step (forward, backward, update) on a random batch, one thread."""
    model = build_model(0).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(batch, 3, 64, 64), torch.randint(0, 10, (batch,))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        with autocast_for(precision, torch.device("cpu")):
            loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - start)
    return 1000 * float(np.median(times[2:]))


def main() -> None:
    torch.set_num_threads(1)
    result = {"cpu-capability": torch.backends.cpu.get_cpu_capability(), "machine": platform.processor()}
    result |= {f"{p}-ms-per-step": round(step_ms(p), 1) for p in ("fp32", "fp16")}
    result["slowdown"] = round(result["fp16-ms-per-step"] / result["fp32-ms-per-step"], 1)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "cpu_bf16.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
