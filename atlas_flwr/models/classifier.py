"""A pretrained backbone with PEFT LoRA and a task head on pooled tokens.

The head is a plain ``nn.Linear`` outside the PEFT model, so the adapter (shared across
tasks) and the head (never shared across tasks) travel as two separate records.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass, field
from functools import lru_cache

import torch
from peft import (
    LoraConfig,
    PeftModel,
    get_peft_model,
    get_peft_model_state_dict,
    set_peft_model_state_dict,
)
from torch import nn
from transformers import (
    AutoModel,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from atlas_flwr.common.config import QUANTIZATIONS
from atlas_flwr.common.errors import ModelError
from atlas_flwr.models.registry import ModelSource, resolve_model

#: The torch dtype of each ``base-dtype``.
BASE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class BaseSettings:
    """How the frozen base model is held: dtype, k-bit quantization (bitsandbytes) and recomputation.

    LoRA factors and the head stay fp32 whatever the base holds (PEFT casts adapters up), so the
    server aggregates the same records either way.
    """

    dtype: str = "fp32"
    quantization: str = "none"
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in BASE_DTYPES:
            raise ModelError(f"base dtype {self.dtype!r} is invalid: expected one of {', '.join(BASE_DTYPES)}")
        if self.quantization not in QUANTIZATIONS:
            raise ModelError(
                f"quantization {self.quantization!r} is invalid: expected one of {', '.join(QUANTIZATIONS)}"
            )


def quantization_config(quantization: str, dtype: str) -> object | None:
    """transformers' ``BitsAndBytesConfig`` for ``8bit`` or ``4bit`` (NF4, compute in ``dtype``); None for none."""
    if quantization == "none":
        return None
    try:
        import bitsandbytes  # noqa: F401  (transformers needs it; fail here with the fix in the message)
    except ImportError as err:
        raise ModelError(
            f"quantization {quantization!r} needs bitsandbytes: pip install 'atlas-flwr[kbit]' (or bitsandbytes)"
        ) from err
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=BASE_DTYPES[dtype],
        bnb_4bit_use_double_quant=False,
    )


@dataclass(frozen=True)
class LoraSettings:
    """LoRA hyper-parameters; ``rank_pattern`` maps module-name patterns to per-layer ranks."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    rank_pattern: dict[str, int] = field(default_factory=dict)
    #: Module paths to adapt (e.g. ``encoder.layer.5.attention.self.query``); empty: the family's
    #: targets in every layer. With heterogeneous ranks a client adapts only some layers.
    target_modules: tuple[str, ...] = ()

    @classmethod
    def from_module_ranks(cls, module_ranks: dict[str, int], alpha: float, dropout: float) -> LoraSettings:
        """Settings that rebuild exactly the adapter described by ``module -> rank`` (PEFT state names).

        This is how a client builds its model from the adapter the server sends: the adapter's
        shapes are the rank pattern, so the two can never disagree.
        """
        if not module_ranks:
            raise ModelError("the adapter holds no LoRA module: cannot build a model from it")
        paths = {_module_path(name): int(r) for name, r in module_ranks.items()}
        bad = {p: r for p, r in paths.items() if r < 1}
        if bad:
            raise ModelError(f"LoRA rank {min(bad.values())} of {min(bad)!r} is invalid: expected >= 1")
        rank = max(paths.values())
        # Full dotted paths: PEFT matches a rank_pattern key only at a dot boundary, so layer.1 is not layer.11.
        return cls(rank=rank, alpha=alpha, dropout=dropout, rank_pattern=paths, target_modules=tuple(sorted(paths)))


def _module_path(state_name: str) -> str:
    """``base_model.model.encoder.layer.0.attention.self.query`` -> ``encoder.layer.0.attention.self.query``."""
    return state_name.removeprefix("base_model.model.")


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Pool token states to one vector per row: masked mean, first token, or last real token."""
    if mode == "mean":
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)
    if mode == "cls":
        return hidden[:, 0]
    if mode == "last":
        # Works for left and right padding: the index of the last 1 in the mask.
        positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
        last = (positions * mask).argmax(dim=1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise ModelError(f"unknown pooling {mode!r}: expected mean, cls or last")


class SequenceClassifier(nn.Module):
    """LoRA-wrapped backbone, pooling, dropout and a linear task head."""

    def __init__(self, backbone: PeftModel, num_labels: int, pooling: str, dropout: float = 0.1) -> None:
        super().__init__()
        self.backbone = backbone
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)
        hidden = backbone.get_base_model().config.hidden_size
        self.head = nn.Linear(hidden, num_labels)
        params = inspect.signature(backbone.get_base_model().forward).parameters
        self._accepts_token_types = "token_type_ids" in params

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits of shape (batch, num_labels)."""
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None and self._accepts_token_types:
            kwargs["token_type_ids"] = token_type_ids
        hidden = self.backbone(**kwargs).last_hidden_state
        pooled = pool(hidden, attention_mask, self.pooling).to(self.head.weight.dtype)  # a bf16/fp16 base
        return self.head(self.dropout(pooled))


@lru_cache(maxsize=4)
def _load_backbone(path: str, dtype: str = "fp32", quantization: str = "none") -> PreTrainedModel:
    # Cached per process: every message builds its model from this frozen copy.
    kwargs: dict = {"dtype": BASE_DTYPES[dtype]}
    quantized = quantization_config(quantization, dtype)
    if quantized is not None:  # bitsandbytes quantizes as it loads; it places the weights itself
        kwargs |= {"quantization_config": quantized, "device_map": "cpu"}
    model = AutoModel.from_pretrained(path, **kwargs)
    for module in model.modules():
        # bitsandbytes 0.50 repacks a 4-bit weight for its CPU inference kernel on the first no-grad eval
        # forward: the packed layout then breaks training (and layers narrower than a 64-block). Keep one layout.
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
    model.requires_grad_(False)
    return model.eval()


@lru_cache(maxsize=4)
def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """The tokenizer of a model; decoder tokenizers without a pad token pad with EOS."""
    source = resolve_model(name)
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError(f"tokenizer of {name!r} has neither a pad nor an eos token: cannot pad batches")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def lora_config(source: ModelSource, lora: LoraSettings) -> LoraConfig:
    """The PEFT LoRA config for a model family (GPT-2's Conv1D needs fan_in_fan_out)."""
    return LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules) or source.lora_targets,
        rank_pattern=dict(lora.rank_pattern),
        fan_in_fan_out=source.family == "gpt2",
        bias="none",
    )


def build_classifier(
    name: str,
    num_labels: int,
    lora: LoraSettings,
    *,
    pooling: str = "mean",
    seed: int = 0,
    base: BaseSettings = BaseSettings(),
) -> SequenceClassifier:
    """A fresh classifier; the LoRA and head initialisation depend on ``seed`` only."""
    source = resolve_model(name)
    backbone = copy.deepcopy(_load_backbone(source.path, base.dtype, base.quantization))
    if base.gradient_checkpointing:
        if not backbone.supports_gradient_checkpointing:
            raise ModelError(f"model {name!r} ({source.family}) does not support gradient checkpointing")
        # Non-reentrant: the frozen embeddings' output needs no grad, and LoRA inside still gets gradients.
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if backbone.config.pad_token_id is None:
        backbone.config.pad_token_id = load_tokenizer(name).pad_token_id
    hidden = backbone.config.hidden_size
    if lora.rank > hidden or any(r > hidden for r in lora.rank_pattern.values()):
        raise ModelError(f"LoRA rank {max([lora.rank, *lora.rank_pattern.values()])} exceeds hidden size {hidden}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = get_peft_model(backbone, lora_config(source, lora))
        model = SequenceClassifier(peft_model, num_labels, pooling)
    return model


def adapter_state(model: SequenceClassifier) -> dict[str, torch.Tensor]:
    """The LoRA factors, keyed as PEFT saves them (adapter name stripped)."""
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model.backbone).items()}


def head_state(model: SequenceClassifier) -> dict[str, torch.Tensor]:
    """The task head's weight and bias."""
    return {k: v.detach().clone() for k, v in model.head.state_dict().items()}


def load_adapter_state(model: SequenceClassifier, state: dict[str, torch.Tensor]) -> None:
    """Load LoRA factors; keys and shapes must match the model's adapters exactly."""
    expected = get_peft_model_state_dict(model.backbone)
    _check_state("adapter", state, expected)
    set_peft_model_state_dict(model.backbone, state)


def load_head_state(model: SequenceClassifier, state: dict[str, torch.Tensor]) -> None:
    """Load a task head; keys and shapes must match."""
    _check_state("head", state, model.head.state_dict())
    model.head.load_state_dict(state)


def _check_state(what: str, got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    if missing or extra:
        raise ModelError(f"{what} keys do not match the model: missing {missing[:3]}, unexpected {extra[:3]}")
    for key, tensor in got.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ModelError(
                f"{what} tensor {key!r} has shape {tuple(tensor.shape)}: expected {tuple(expected[key].shape)}"
            )
