"""The split classifier: bottom-then-top equals the full model, forward and backward, for every family."""

from __future__ import annotations

import pytest
import torch

from atlas_flwr.common.errors import ModelError
from atlas_flwr.models.classifier import LoraSettings, build_classifier, load_tokenizer
from atlas_flwr.models.registry import resolve_model
from atlas_flwr.models.split import SplitClassifier, num_blocks
from tests.conftest import FAMILIES

TEXTS = ["a gripping, funny film", "dull", "the cat sat on the mat and looked at the rain for a long time"]


def _model_and_batch(path: str):
    model = build_classifier(path, 2, LoraSettings(rank=4, dropout=0.0), seed=0)
    with torch.no_grad():  # B starts at zero: give LoRA a real contribution so a lost adapter would show
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    batch = load_tokenizer(path)(TEXTS, padding=True, return_tensors="pt")
    return model.eval(), batch


@pytest.mark.parametrize("family", FAMILIES)
def test_bottom_then_top_equals_the_full_forward_and_gradients(tiny_models: dict, family: str) -> None:
    model, batch = _model_and_batch(tiny_models[family])
    assert resolve_model(tiny_models[family]).family == family
    split = SplitClassifier(model, family, cut=1)
    labels = torch.tensor([1, 0, 1])
    loss_fn = torch.nn.CrossEntropyLoss()
    token_types = batch.get("token_type_ids")

    full = model(batch["input_ids"], batch["attention_mask"], token_types)
    loss_fn(full, labels).backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)

    # The protocol: the client sends activations, the server returns their gradient, the client backpropagates.
    activations = split.bottom(batch["input_ids"], batch["attention_mask"], token_types)
    received = activations.detach().requires_grad_(True)
    logits = split.top(received, batch["attention_mask"])
    torch.testing.assert_close(logits, full, atol=1e-5, rtol=1e-5)
    loss_fn(logits, labels).backward()
    activations.backward(received.grad)
    for name, param in model.named_parameters():
        if param.requires_grad:
            torch.testing.assert_close(param.grad, expected[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_each_side_owns_its_lora(tiny_models: dict, family: str) -> None:
    model, _ = _model_and_batch(tiny_models[family])
    split = SplitClassifier(model, family, cut=1)
    client, server = split.parameters("client"), split.parameters("server")
    names = {id(p): n for n, p in model.named_parameters()}
    assert client and all("lora_" in names[id(p)] for p in client)
    assert any(names[id(p)].startswith("head.") for p in server)
    assert {id(p) for p in client}.isdisjoint(id(p) for p in server)
    assert len(client) + len(server) == sum(p.requires_grad for p in model.parameters())
    # Block 0 is the client's, block 1 the server's.
    assert all(".0." in names[id(p)] for p in client) and not any(".0." in names[id(p)] for p in server)


def test_split_point_out_of_range_is_one_line(tiny_models: dict) -> None:
    model, _ = _model_and_batch(tiny_models["bert"])
    assert num_blocks(model, "bert") == 2
    with pytest.raises(ModelError, match="split point 2 is invalid for a 2-block model: expected 1..1"):
        SplitClassifier(model, "bert", cut=2)


@pytest.mark.parametrize("family", ["bert", "gpt2", "qwen2"])
def test_a_client_drops_the_top_and_its_bottom_is_unchanged(tiny_models: dict, family: str) -> None:
    model, batch = _model_and_batch(tiny_models[family])
    split = SplitClassifier(model, family, cut=1)
    token_types = batch.get("token_type_ids")
    before = split.bottom(batch["input_ids"], batch["attention_mask"], token_types).detach()
    client_params = [id(p) for p in split.parameters("client")]
    size = sum(p.numel() for p in model.parameters())
    split.drop_top()
    assert sum(p.numel() for p in model.parameters()) < size  # block 1's weights are gone from the client
    assert num_blocks(model, family) == 1 and [id(p) for p in split.parameters("client")] == client_params
    torch.testing.assert_close(split.bottom(batch["input_ids"], batch["attention_mask"], token_types), before)
    with pytest.raises(ModelError, match="dropped its top"):
        split.top(before, batch["attention_mask"])
