"""LoRA adapters and heads on the wire in fp16 and int8: fewer bytes, nearly the same training."""

from __future__ import annotations

import json

import numpy as np
import pytest

from atlas_flwr.client_app import app as client_app
from atlas_flwr.common.codec import decode_update, encode_update, held_by_client
from atlas_flwr.common.config import Config
from atlas_flwr.server_app import run_federation
from atlas_tools.local_grid import LocalGrid


def test_an_int8_update_decodes_within_half_a_step_of_the_new_weights() -> None:
    rng = np.random.default_rng(0)
    received = {"a.lora_A.weight": rng.normal(size=(8, 32)).astype(np.float32), "bias": np.zeros(4, np.float32)}
    new = {k: v + rng.normal(scale=1e-3, size=v.shape).astype(np.float32) for k, v in received.items()}
    held = held_by_client(received, "int8")
    assert not np.array_equal(held["a.lora_A.weight"], received["a.lora_A.weight"])  # the download is quantized
    back = decode_update(encode_update(new, held, "int8"), held, "int8")
    step = np.abs(new["a.lora_A.weight"] - held["a.lora_A.weight"]).max(axis=1, keepdims=True) / 127
    assert np.all(np.abs(back["a.lora_A.weight"] - new["a.lora_A.weight"]) <= step / 2 + 1e-7)
    assert np.array_equal(back["bias"], new["bias"])  # vectors stay fp32
    assert decode_update(encode_update(new, received, "fp32"), received, "fp32")["bias"] is not None


@pytest.fixture()
def tiny(run_config: dict, tiny_models: dict) -> dict:
    run_config.update(
        {
            "strategy": "fedavg",
            "model": tiny_models["bert"],
            "tasks": "sst2",
            "clients-per-task": 2,
            "max-samples-per-client": 16,
            "max-eval-samples": 16,
            "num-server-rounds": 2,
            "batch-size": 8,
            "lr": 0.01,
            "max-length": 32,
            "lora-rank": 8,
        }
    )
    return run_config


def _run(values: dict):
    cfg = Config.from_run_config(values)
    return run_federation(LocalGrid(client_app, values, cfg.num_clients), cfg)


def test_precision_shrinks_the_messages_and_keeps_training_close(tiny: dict) -> None:
    runs = {p: _run({**tiny, "precision": p, "run-name": p}) for p in ("fp32", "int8")}
    up = {p: json.loads((r.run_dir / "rounds.json").read_text())[-1]["bytes-received"] for p, r in runs.items()}
    # A tiny model's tensors are small next to their record headers and scales: MiniLM saves far more.
    assert up["int8"] < 0.65 * up["fp32"], up
    reference = runs["fp32"].strategy.state_for(0)[0]
    for precision in ("int8",):
        adapter = runs[precision].strategy.state_for(0)[0]
        assert set(adapter) == set(reference)
        diff = np.sqrt(sum(np.sum((adapter[k] - reference[k]) ** 2) for k in reference))
        norm = np.sqrt(sum(np.sum(reference[k] ** 2) for k in reference))
        assert 0 < diff < 0.05 * norm, (precision, diff, norm)  # changed by the codec, but only a little
