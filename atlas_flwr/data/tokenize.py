"""Tokenization and batching: truncate at ``max-length``, pad each batch to its longest row."""

from __future__ import annotations

from typing import Any

import datasets
import torch
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase
from transformers.trainer_pt_utils import LengthGroupedSampler

from atlas_flwr.data.glue import TaskSpec


def tokenize(
    rows: datasets.Dataset, spec: TaskSpec, tokenizer: PreTrainedTokenizerBase, max_length: int
) -> datasets.Dataset:
    """Token ids and labels, unpadded (the collator pads per batch, 3.5x faster than max-length)."""

    def encode(batch: dict[str, list]) -> dict[str, list]:
        texts = [batch[c] for c in spec.text_columns]
        enc = tokenizer(*texts, truncation=True, max_length=max_length)
        enc["labels"] = batch["label"]
        return enc

    return rows.map(encode, batched=True, remove_columns=rows.column_names, keep_in_memory=True)


def make_loader(
    encoded: datasets.Dataset,
    tokenizer: PreTrainedTokenizerBase,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    group_by_length: bool = False,
    pad_to: int | None = None,
) -> DataLoader:
    """A DataLoader whose shuffle order depends on ``seed`` only.

    With ``group_by_length`` (and ``shuffle``), rows are shuffled, cut into mega-batches and
    sorted by length inside each (transformers' ``LengthGroupedSampler``), so a batch pads
    little: pair tasks train about 1.5x faster on CPU. Batches are padded to their longest row,
    or to ``pad_to`` tokens (static shapes, as some accelerators want; much slower on CPU).
    """
    return DataLoader(
        encoded,
        batch_size=batch_size,
        collate_fn=collator(tokenizer, pad_to),
        **_sampling(encoded, batch_size, shuffle, seed, group_by_length),
    )


def index_loader(
    encoded: datasets.Dataset, batch_size: int, *, shuffle: bool, seed: int = 0, group_by_length: bool = False
) -> DataLoader:
    """The row indices of :func:`make_loader`'s batches, batch for batch and epoch for epoch (split learning
    sends a batch per message, and must take the steps a federated client takes)."""
    return DataLoader(
        range(len(encoded)),
        batch_size=batch_size,
        collate_fn=list,
        **_sampling(encoded, batch_size, shuffle, seed, group_by_length),
    )


def _sampling(
    encoded: datasets.Dataset, batch_size: int, shuffle: bool, seed: int, group_by_length: bool
) -> dict[str, Any]:
    # A DataLoader draws from its generator when each pass starts; both loaders must see the same draws.
    generator = torch.Generator().manual_seed(seed)
    sampler = None
    if shuffle and group_by_length:
        lengths = [len(ids) for ids in encoded["input_ids"]]
        sampler = LengthGroupedSampler(batch_size, lengths=lengths, generator=generator)
    return {"shuffle": shuffle and sampler is None, "sampler": sampler, "generator": generator}


def collator(tokenizer: PreTrainedTokenizerBase, pad_to: int | None = None) -> DataCollatorWithPadding:
    """Pads a batch to its longest row, or to ``pad_to`` tokens."""
    if pad_to is None:
        return DataCollatorWithPadding(tokenizer)
    return DataCollatorWithPadding(tokenizer, padding="max_length", max_length=pad_to)


def batch_slices(batch: dict[str, torch.Tensor], size: int) -> list[dict[str, torch.Tensor]]:
    """A padded batch as consecutive slices of at most ``size`` rows (0: the whole batch), every key cut alike.

    A slice keeps the batch's padding, so each row computes what it computes in the whole batch.
    """
    rows = len(next(iter(batch.values())))
    size = size or rows
    return [{k: v[start : start + size] for k, v in batch.items()} for start in range(0, rows, size)]
