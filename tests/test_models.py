"""Model registry and LoRA wrapping, on tiny random-init models of every family."""

from __future__ import annotations

import pytest
import torch

from atlas_flwr.common.errors import ModelError
from atlas_flwr.models.classifier import (
    LoraSettings,
    adapter_state,
    build_classifier,
    head_state,
    load_adapter_state,
    load_tokenizer,
    pool,
)
from atlas_flwr.models.registry import MODEL_ALIASES, resolve_model
from tests.conftest import FAMILIES

EXPECTED_TARGETS = {
    "bert": {"query", "value"},
    "distilbert": {"q_lin", "v_lin"},
    "roberta": {"query", "value"},
    "gpt2": {"c_attn"},
    "qwen2": {"q_proj", "v_proj"},
    "llama": {"q_proj", "v_proj"},
}


def _batch(name: str) -> dict[str, torch.Tensor]:
    tok = load_tokenizer(name)
    enc = tok(["a short one", "a somewhat longer sentence with more tokens"], padding=True, return_tensors="pt")
    return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


@pytest.mark.parametrize("family", FAMILIES)
def test_family_gets_lora_on_its_attention_projections(tiny_models: dict, family: str) -> None:
    path = tiny_models[family]
    assert resolve_model(path).family == family
    model = build_classifier(path, 2, LoraSettings(rank=4, alpha=8), seed=0)
    lora_parents = {n.split(".")[-1] for n, m in model.backbone.named_modules() if hasattr(m, "lora_A")}
    assert lora_parents == EXPECTED_TARGETS[family]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or n.startswith("head.") for n in trainable)
    assert {"head.weight", "head.bias"} <= trainable
    logits = model(**_batch(path))
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_adapter_round_trip_and_training_moves_only_lora_and_head(tiny_models: dict, family: str) -> None:
    path = tiny_models[family]
    model = build_classifier(path, 2, LoraSettings(rank=4, alpha=8), seed=0)
    frozen_before = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = adapter_state(model)
    assert before and all(("lora_A" in k or "lora_B" in k) for k in before)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = _batch(path)
    for _ in range(3):
        loss = torch.nn.functional.cross_entropy(model(**batch), torch.tensor([0, 1]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = adapter_state(model)
    assert any(not torch.equal(before[k], after[k]) for k in before if "lora_B" in k)
    assert all(torch.equal(p, frozen_before[n]) for n, p in model.named_parameters() if not p.requires_grad)
    fresh = build_classifier(path, 2, LoraSettings(rank=4, alpha=8), seed=0)
    load_adapter_state(fresh, after)
    assert all(torch.equal(adapter_state(fresh)[k], after[k]) for k in after)


def test_same_seed_same_init_other_seed_other_init(tiny_models: dict) -> None:
    path = tiny_models["bert"]
    a, b = (build_classifier(path, 2, LoraSettings(), seed=s) for s in (1, 1))
    c = build_classifier(path, 2, LoraSettings(), seed=2)
    key = next(k for k in adapter_state(a) if "lora_A" in k)
    assert torch.equal(adapter_state(a)[key], adapter_state(b)[key])
    assert not torch.equal(adapter_state(a)[key], adapter_state(c)[key])
    assert torch.equal(head_state(a)["weight"], head_state(b)["weight"])


def test_wrong_adapter_shapes_and_keys_are_refused(tiny_models: dict) -> None:
    path = tiny_models["bert"]
    model = build_classifier(path, 2, LoraSettings(rank=4), seed=0)
    state = adapter_state(build_classifier(path, 2, LoraSettings(rank=2), seed=0))
    with pytest.raises(ModelError, match=r"has shape \(2, 32\): expected \(4, 32\)"):
        load_adapter_state(model, state)
    good = adapter_state(model)
    good.pop(next(iter(good)))
    with pytest.raises(ModelError, match="missing"):
        load_adapter_state(model, good)


def test_rank_above_hidden_size_is_refused(tiny_models: dict) -> None:
    with pytest.raises(ModelError, match="LoRA rank 64 exceeds hidden size 32"):
        build_classifier(tiny_models["bert"], 2, LoraSettings(rank=64), seed=0)


def test_unknown_model_names_the_aliases() -> None:
    with pytest.raises(ModelError) as info:
        resolve_model("bert-huge")
    assert "unknown model 'bert-huge'" in str(info.value) and "minilm-l6" in str(info.value)
    assert "\n" not in str(info.value)


def test_default_minilm_loads_offline_with_expected_trainable_size() -> None:
    source = resolve_model("minilm-l6")
    assert source.family == "bert" and MODEL_ALIASES["minilm-l6"].startswith("package:")
    model = build_classifier("minilm-l6", 2, LoraSettings(rank=8, alpha=16), seed=0)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # 6 layers x (query + value) x r=8 x (384 + 384) = 73,728 LoRA + 770 head
    assert trainable == 74_498


def test_last_pooling_ignores_padding_side() -> None:
    hidden = torch.arange(2 * 4 * 3, dtype=torch.float32).reshape(2, 4, 3)
    right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    assert torch.equal(pool(hidden, right, "last")[0], hidden[0, 1])
    assert torch.equal(pool(hidden, left, "last")[0], hidden[0, 3])
    assert torch.allclose(pool(hidden, right, "mean")[0], hidden[0, :2].mean(0))
