"""A client's local work: its data, its model, one train call and one evaluation."""

from __future__ import annotations

import hashlib
from collections.abc import Collection
from dataclasses import dataclass
from functools import lru_cache

import datasets
import numpy as np
import torch

from atlas_flwr.client.fingerprint import (
    Fingerprint,
    FingerprintSettings,
    class_balance_weights,
    example_features,
    layer_of,
    privatize,
)
from atlas_flwr.client.train import TrainResult, evaluate, pick_device, seed_for, train_local
from atlas_flwr.common.config import Config
from atlas_flwr.common.errors import AtlasError
from atlas_flwr.common.records import State, module_of, to_torch, without_modules
from atlas_flwr.common.state import module_ranks
from atlas_flwr.data import (
    client_partition,
    eval_rows,
    make_loader,
    task_spec,
    tokenize,
)
from atlas_flwr.models.classifier import (
    BaseSettings,
    LoraSettings,
    SequenceClassifier,
    adapter_state,
    build_classifier,
    head_state,
    load_adapter_state,
    load_head_state,
    load_tokenizer,
)


@dataclass(frozen=True)
class ClientData:
    """Tokenized train rows (this client's partition) and eval rows (its task's validation)."""

    task: str
    train: datasets.Dataset
    eval: datasets.Dataset

    @property
    def eval_digest(self) -> str:
        """A digest of the evaluation rows: clients with equal digests evaluate on the same data."""
        digest = hashlib.sha256(self.task.encode())
        for ids, label in zip(self.eval["input_ids"], self.eval["labels"], strict=True):
            digest.update(np.asarray([*ids, -1, label], dtype=np.int64).tobytes())
        return digest.hexdigest()[:16]


def lora_settings(cfg: Config) -> LoraSettings:
    """Uniform LoRA settings from the run config."""
    return LoraSettings(rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout)


@lru_cache(maxsize=64)
def client_data(cfg: Config, client_id: int) -> ClientData:
    """Load, partition and tokenize once per process; the Config is the cache key."""
    task, index = cfg.task_of(client_id)
    spec = task_spec(task)
    tokenizer = load_tokenizer(cfg.model)
    data_dir = cfg.resolved_data_dir()
    # The centralized reference pools every client's rows of the task on the task's first client.
    indices = range(cfg.clients_for(task)) if cfg.pooled and index == 0 else [index]
    partitioner, alpha = cfg.partitioner_for(task)
    parts = [
        client_partition(
            task,
            i,
            cfg.clients_for(task),
            data_dir=data_dir,
            partitioner=partitioner,
            alpha=alpha,
            seed=cfg.seed,
            max_samples=cfg.max_samples_for(task),
        )
        for i in indices
    ]
    rows = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    train = tokenize(rows, spec, tokenizer, cfg.max_length)
    evals = tokenize(
        eval_rows(task, data_dir=data_dir, max_samples=cfg.max_eval_samples, seed=cfg.seed),
        spec,
        tokenizer,
        cfg.max_length,
    )
    # Sorted by length, eval batches carry little padding; metrics do not depend on order.
    order = np.argsort([len(ids) for ids in evals["input_ids"]], kind="stable")
    return ClientData(task=task, train=train, eval=evals.select(order))


def new_model(cfg: Config, task: str, lora: LoraSettings | None = None) -> SequenceClassifier:
    """A classifier for ``task`` with the run's model and LoRA settings (seeded by the run seed)."""
    return build_classifier(
        cfg.model,
        task_spec(task).num_labels,
        lora or lora_settings(cfg),
        pooling=cfg.pooling,
        seed=cfg.seed,
        base=BaseSettings(cfg.base_dtype, cfg.quantization, cfg.gradient_checkpointing),
    )


def initial_state(cfg: Config, ranks: dict[str, int] | None = None) -> tuple[dict, dict]:
    """The adapter and head a client starts from, as the server builds them.

    ``ranks`` (module -> rank, PEFT state names) gives a heterogeneous adapter; None the uniform one.
    """
    lora = None if ranks is None else LoraSettings.from_module_ranks(ranks, cfg.lora_alpha, cfg.lora_dropout)
    model = new_model(cfg, cfg.tasks[0], lora)
    return adapter_state(model), head_state(model)


def modules_per_layer(adapter: State) -> list[list[str]]:
    """The adapted module names of each layer, in layer order (PEFT state names)."""
    layers: dict[int, list[str]] = {}
    for module in module_ranks(adapter):
        layers.setdefault(layer_of(module), []).append(module)
    return [sorted(layers[i]) for i in sorted(layers)]


def loaded_model(cfg: Config, task: str, adapter: State, head: State) -> SequenceClassifier:
    """A classifier holding exactly ``adapter`` (its shapes are the rank pattern) and ``head``."""
    # The adapter's shapes are the rank pattern: the model is built to hold exactly this adapter.
    lora = LoraSettings.from_module_ranks(module_ranks(adapter), cfg.lora_alpha, cfg.lora_dropout)
    model = new_model(cfg, task, lora)
    load_adapter_state(model, to_torch(adapter))
    load_head_state(model, to_torch(head))
    return model


def run_train(
    cfg: Config,
    client_id: int,
    server_round: int,
    adapter: State,
    head: State,
    frozen: Collection[str] = frozenset(),
) -> tuple[dict, dict, TrainResult]:
    """Train from the given adapter and head; seeded by (seed, client, round).

    The modules in ``frozen`` take part in the forward pass but are not trained, and are left out of
    the returned adapter. Below the first trained layer no gradient flows, so they store nothing for it.
    """
    data = client_data(cfg, client_id)
    model = loaded_model(cfg, data.task, adapter, head)
    unknown = set(frozen) - set(module_ranks(adapter))
    if unknown:
        raise AtlasError(f"frozen module {min(unknown)!r} is not in the received adapter")
    for name, param in model.backbone.named_parameters():
        if ".lora_" in name and module_of(name) in frozen:
            param.requires_grad_(False)
    seed = seed_for(cfg.seed, client_id, server_round)
    torch.manual_seed(seed)  # LoRA dropout and head dropout
    loader = make_loader(
        data.train,
        load_tokenizer(cfg.model),
        cfg.batch_size,
        shuffle=True,
        seed=seed,
        group_by_length=cfg.group_by_length,
        pad_to=cfg.pad_to,
    )
    scale = cfg.lr_at(server_round) / cfg.lr  # the schedule scales the adapter and head rates alike
    result = train_local(
        model,
        loader,
        epochs=cfg.epochs_for(data.task),
        lr=cfg.lr * scale,
        head_lr=cfg.head_lr * scale,
        weight_decay=cfg.weight_decay,
        device=pick_device(cfg.device),
        rank_penalty=(cfg.hetlora_gamma, cfg.hetlora_lambda) if cfg.strategy == "hetlora" else None,
    )
    return without_modules(adapter_state(model), frozen), head_state(model), result


def run_evaluate(cfg: Config, client_id: int, adapter: State, head: State, micro_batch: int = 0) -> dict[str, float]:
    """Metrics of the given adapter and head on the client's task validation rows."""
    data = client_data(cfg, client_id)
    model = loaded_model(cfg, data.task, adapter, head)
    loader = make_loader(data.eval, load_tokenizer(cfg.model), cfg.eval_batch_size, shuffle=False, pad_to=cfg.pad_to)
    return evaluate(model, loader, pick_device(cfg.device), micro_batch)


def fingerprint_settings(cfg: Config) -> FingerprintSettings:
    """The run's fingerprint settings (the projection seed is the run seed: every client shares it)."""
    return FingerprintSettings(
        kind=cfg.fingerprint_kind,
        dim=cfg.fingerprint_dim,
        clip=cfg.fingerprint_clip,
        noise=cfg.fingerprint_noise,
        delta=cfg.fingerprint_delta,
        seed=cfg.seed,
        max_rows=cfg.fingerprint_rows,
        depth=cfg.fingerprint_depth,
    )


def compute_fingerprint(
    cfg: Config, client_id: int, settings: FingerprintSettings, micro_batch: int = 0
) -> Fingerprint:
    """The client's task fingerprint, from the run's initial model (same seed as the server's)."""
    features = fingerprint_features(cfg, client_id, settings, micro_batch)
    return privatize_features(cfg, client_id, settings, *features)


def fingerprint_features(
    cfg: Config, client_id: int, settings: FingerprintSettings, micro_batch: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-row features, labels and layer importance (these never leave the client)."""
    data = client_data(cfg, client_id)
    model = new_model(cfg, data.task)
    rows = data.train.select(range(min(settings.max_rows, len(data.train))))
    batch_size = 1 if settings.kind == "lora-grad" else cfg.eval_batch_size
    loader = make_loader(rows, load_tokenizer(cfg.model), batch_size, shuffle=False)
    device = pick_device(cfg.device)
    return example_features(model, loader, settings.kind, device, settings.max_rows, settings.depth, micro_batch)


def privatize_features(
    cfg: Config,
    client_id: int,
    settings: FingerprintSettings,
    features: np.ndarray,
    labels: np.ndarray,
    importance: np.ndarray,
) -> Fingerprint:
    """The released fingerprint of :func:`fingerprint_features`' output (projected, clipped, noised)."""
    weights = class_balance_weights(labels) if settings.kind == "embedding-labels" else None
    vector, epsilon = privatize(features, settings, noise_seed=seed_for(cfg.seed, client_id, 0, 1), weights=weights)
    return Fingerprint(vector, importance, len(features), epsilon, settings.delta)
