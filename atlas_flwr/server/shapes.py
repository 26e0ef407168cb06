"""The server's view of a run for its memory model: the model's shape and the largest training step.

Server side only (planning, preflight, split cuts): it imports the memory model from ``strategies/``,
which no client module does.
"""

from __future__ import annotations

from transformers import AutoConfig

from atlas_flwr.common.config import Config
from atlas_flwr.models.classifier import BASE_DTYPES
from atlas_flwr.models.registry import resolve_model
from strategies.memory import ModelShape, TrainShape


def model_shape(cfg: Config) -> ModelShape:
    """The memory model's view of the run's model and LoRA targets."""
    source = resolve_model(cfg.model)
    return ModelShape.from_hf_config(AutoConfig.from_pretrained(source.path).to_dict(), source.lora_targets)


#: Bytes per parameter of each ``base-dtype``, from the torch dtype the classifier loads it in.
BASE_DTYPE_BYTES = {name: dtype.itemsize for name, dtype in BASE_DTYPES.items()}


def train_shape(cfg: Config) -> TrainShape:
    """The largest training step a client runs: a full batch padded to ``max-length``, the base as held.

    Activations are priced in the calibrations' units (fp32 on the CPU, fp16 autocast on CUDA) whatever the
    base dtype: on the CPU a 16-bit base keeps 16-bit activations, so its prediction is an upper bound.
    """
    return TrainShape(
        batch=cfg.batch_size,
        seq_len=cfg.max_length,
        quantization=cfg.quantization,
        checkpointing=cfg.gradient_checkpointing,
        weight_bytes=BASE_DTYPE_BYTES[cfg.base_dtype],
    )
