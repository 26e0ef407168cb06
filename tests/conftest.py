"""Shared fixtures: the real GLUE folder, the app's default run config, tiny models per family."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ("bert", "distilbert", "roberta", "gpt2", "qwen2", "llama")


@pytest.fixture(scope="session")
def glue_dir() -> str:
    """The GLUE parquet folder: $ATLAS_DATA_DIR or ../shared/data/glue beside the repo."""
    path = Path(os.environ.get("ATLAS_DATA_DIR") or ROOT.parent / "shared" / "data" / "glue")
    if not (path / "sst2" / "train.parquet").is_file():
        pytest.fail(f"GLUE data not found at {path}: set ATLAS_DATA_DIR")
    return str(path)


@pytest.fixture()
def run_config(glue_dir: str, tmp_path: Path) -> dict:
    """The app's default run config (from pyproject), pointed at local data and tmp output."""
    with (ROOT / "pyproject.toml").open("rb") as fh:
        values = dict(tomllib.load(fh)["tool"]["flwr"]["app"]["config"])
    values.update({"data-dir": glue_dir, "output-dir": str(tmp_path / "outputs")})
    return values


def _tiny_config(family: str, vocab_size: int, pad_id: int):
    from transformers import (
        BertConfig,
        DistilBertConfig,
        GPT2Config,
        LlamaConfig,
        Qwen2Config,
        RobertaConfig,
    )

    common = {"vocab_size": vocab_size}
    if family == "bert":
        return BertConfig(**common, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    if family == "distilbert":
        return DistilBertConfig(**common, dim=32, n_layers=2, n_heads=2, hidden_dim=64)
    if family == "roberta":
        return RobertaConfig(
            **common,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=64,
            pad_token_id=pad_id,
            max_position_embeddings=600,
        )
    if family == "gpt2":
        return GPT2Config(**common, n_embd=32, n_layer=2, n_head=2, n_positions=512)
    decoder = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
    }
    return (Qwen2Config if family == "qwen2" else LlamaConfig)(**common, **decoder)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A saved random-init model of each family (2 layers, hidden 32), with a tokenizer."""
    import torch
    from transformers import AutoModel

    from atlas_flwr.models.classifier import load_tokenizer

    tokenizer = load_tokenizer("minilm-l6")
    root = tmp_path_factory.mktemp("tiny-models")
    out = {}
    for family in FAMILIES:
        torch.manual_seed(0)
        model = AutoModel.from_config(_tiny_config(family, len(tokenizer), tokenizer.pad_token_id))
        path = root / family
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
        out[family] = str(path)
    return out


def binding_tiers(cfg) -> str:
    """Two device tiers for the tiny model: one that holds only the top layer's adapter, one that holds all.

    Priced with the calibration the server plans with: that of the device the clients train on."""
    from atlas_flwr.client.train import pick_device
    from atlas_flwr.server.shapes import model_shape, train_shape
    from strategies.memory import Calibration, predict_peak_bytes

    shape, step = model_shape(cfg), train_shape(cfg)
    cal = Calibration.for_device(pick_device(cfg.device).type)
    top_only = predict_peak_bytes(shape, step, [0] * (shape.num_layers - 1) + [cfg.lora_rank], calibration=cal)["total"]
    full = predict_peak_bytes(shape, step, [cfg.lora_rank] * shape.num_layers, calibration=cal)["total"]
    assert top_only < full
    return f"{(top_only + full) // 2}B,{2 * full}B"
