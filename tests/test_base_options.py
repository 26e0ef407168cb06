"""How the frozen base is held: bf16/fp16 dtype, 8/4-bit bitsandbytes quantization, gradient checkpointing."""

from __future__ import annotations

import builtins

import pytest
import torch

from atlas_flwr.common.errors import ModelError
from atlas_flwr.models.classifier import BaseSettings, LoraSettings, adapter_state, build_classifier

LORA = LoraSettings(rank=4, alpha=8.0, dropout=0.1)
IDS = torch.randint(5, 200, (4, 12), generator=torch.Generator().manual_seed(0))
MASK = torch.ones_like(IDS)
LABELS = torch.tensor([0, 1, 1, 0])


def _step(model: torch.nn.Module, seed: int = 0) -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and LoRA gradients of one training step, with dropout drawn from ``seed``."""
    model.train()
    torch.manual_seed(seed)
    loss = torch.nn.functional.cross_entropy(model(input_ids=IDS, attention_mask=MASK), LABELS)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and "lora_" in n}
    return loss.item(), grads


def _moves_every_b(grads: dict[str, torch.Tensor]) -> bool:
    # B starts at zero, so at the first step only the B factors get a gradient (A's is B^T times it).
    return bool(grads) and all(g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)


def _weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the frozen base's parameters (LoRA factors excluded)."""
    named = model.backbone.get_base_model().named_parameters()
    return sum(p.numel() * p.element_size() for n, p in named if "lora_" not in n)


@pytest.mark.parametrize("family", ["bert", "qwen2"])
def test_gradient_checkpointing_gives_the_same_step(tiny_models: dict, family: str) -> None:
    plain = build_classifier(tiny_models[family], 2, LORA, seed=3)
    recomputed = build_classifier(tiny_models[family], 2, LORA, seed=3, base=BaseSettings(gradient_checkpointing=True))
    assert recomputed.backbone.get_base_model().is_gradient_checkpointing
    loss, grads = _step(plain)
    loss_ckpt, grads_ckpt = _step(recomputed)
    assert loss == pytest.approx(loss_ckpt, rel=1e-6)  # the recomputation replays the same dropout masks
    assert grads.keys() == grads_ckpt.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(grads_ckpt[name], grad, rtol=1e-5, atol=1e-7)
    assert _moves_every_b(grads)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_precision_base_keeps_adapters_and_head_fp32(tiny_models: dict, dtype: str) -> None:
    model = build_classifier(tiny_models["qwen2"], 2, LORA, seed=3, base=BaseSettings(dtype=dtype))
    full = build_classifier(tiny_models["qwen2"], 2, LORA, seed=3)
    assert _weight_bytes(model) * 2 == _weight_bytes(full)
    assert all(v.dtype == torch.float32 for v in adapter_state(model).values())
    assert model.head.weight.dtype == torch.float32
    loss, grads = _step(model)
    assert torch.isfinite(torch.tensor(loss)) and _moves_every_b(grads)
    assert all(g.dtype == torch.float32 for g in grads.values())
    # The same LoRA init: the two models' adapters are interchangeable records.
    assert adapter_state(model).keys() == adapter_state(full).keys()


@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_kbit_base_trains_lora_and_shrinks_the_linear_weights(tiny_models: dict, quantization: str) -> None:
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    kinds = {"8bit": bnb.nn.Linear8bitLt, "4bit": bnb.nn.Linear4bit}
    model = build_classifier(tiny_models["qwen2"], 2, LORA, seed=3, base=BaseSettings(quantization=quantization))
    full = build_classifier(tiny_models["qwen2"], 2, LORA, seed=3)
    layer = model.backbone.get_base_model().layers[0]
    assert isinstance(layer.mlp.up_proj, kinds[quantization])  # every linear layer, not only the adapted ones
    assert isinstance(layer.self_attn.q_proj.base_layer, kinds[quantization])
    assert _weight_bytes(model) < _weight_bytes(full)
    with torch.no_grad():  # the same function up to the quantization error
        model.eval(), full.eval()
        hidden = [m.backbone(input_ids=IDS, attention_mask=MASK).last_hidden_state.flatten() for m in (model, full)]
    assert torch.nn.functional.cosine_similarity(*hidden, dim=0) > 0.9
    # Evaluation and training alternate on one model (bitsandbytes' CPU inference layout must not stick).
    for _ in range(2):
        loss, grads = _step(model)
        assert torch.isfinite(torch.tensor(loss)) and _moves_every_b(grads)
        model.eval()
        with torch.no_grad():
            model(input_ids=IDS, attention_mask=MASK)


def test_kbit_without_bitsandbytes_is_one_line(tiny_models: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_bnb(name: str, *args, **kwargs):
        if name == "bitsandbytes":
            raise ImportError("No module named 'bitsandbytes'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bnb)
    with pytest.raises(ModelError, match=r"quantization '4bit' needs bitsandbytes: pip install") as err:
        build_classifier(tiny_models["llama"], 2, LORA, base=BaseSettings(quantization="4bit", dtype="bf16"))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_memory_model_prices_the_kbit_layers_bitsandbytes_builds(tiny_models: dict, quantization: str) -> None:
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb
    from transformers import AutoConfig

    from strategies.memory import ModelShape, TrainShape

    model = build_classifier(tiny_models["qwen2"], 2, LORA, base=BaseSettings(quantization=quantization))
    stored = 0
    for module in model.backbone.get_base_model().modules():
        # bitsandbytes' own layers only: PEFT's LoRA wrappers around them share the class name
        if not isinstance(module, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)):
            continue
        weight = module.weight
        stored += weight.numel() * weight.element_size()
        scales = weight.quant_state.absmax if quantization == "4bit" else weight.SCB
        stored += scales.numel() * scales.element_size()
    config = AutoConfig.from_pretrained(tiny_models["qwen2"]).to_dict()
    shape = ModelShape.from_hf_config(config, ["q_proj", "v_proj"])
    predicted = shape.num_layers * shape.linear_weight_bytes_per_layer(TrainShape(4, 16, quantization=quantization))
    assert stored == pytest.approx(predicted, rel=0.01)


def test_the_plan_prices_the_base_as_the_config_holds_it(run_config: dict) -> None:
    from atlas_flwr.common.config import Config
    from atlas_flwr.server.shapes import train_shape

    plain = train_shape(Config.from_run_config(run_config))
    assert (plain.quantization, plain.checkpointing, plain.base_bytes) == ("none", False, 4)
    held = {"quantization": "4bit", "gradient-checkpointing": True, "base-dtype": "fp16"}
    step = train_shape(Config.from_run_config(run_config | held))
    assert (step.quantization, step.checkpointing, step.base_bytes, step.dtype_bytes) == ("4bit", True, 2, 4)
