"""The client's side of split learning: one ``train.split`` message per step.

A step message may carry the gradient of the previous step's activations (the client applies it)
and asks for the next batch's activations (the client sends them with the attention mask and the
labels). The first message of a round carries the bottom adapter; the last one asks for it back.
Between messages the client keeps its bottom adapter, AdamW state and the random state its last
forward started from in ``context.state``, because the simulation engine does not tie a node to
one worker process. A worker that still holds the graph of the previous forward uses it; another
one recomputes that forward from the same random state. Each step's random state (the CPU
generator's, and the CUDA one's on a GPU) travels with the activations and the gradient (5 KB), so
dropout draws what a federated client's would. On CUDA the bottom runs in fp16 autocast; the gradient
comes with the loss scale, and the reply says whether this half overflowed (``overflow``), so that
the server skips its step with the client's.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import lru_cache

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from atlas_flwr.client.local import client_data, new_model
from atlas_flwr.client.train import pick_device, seed_for
from atlas_flwr.common.config import Config
from atlas_flwr.common.errors import AtlasError
from atlas_flwr.common.records import from_record, to_record, to_torch
from atlas_flwr.common.split_train import ClientSide, Rng, RngState, rng_arrays, rng_from
from atlas_flwr.common.state import module_ranks
from atlas_flwr.data.tokenize import collator
from atlas_flwr.models.classifier import LoraSettings, adapter_state, load_adapter_state, load_tokenizer
from atlas_flwr.models.registry import resolve_model
from atlas_flwr.models.split import SplitClassifier

STATE_ADAPTER, STATE_OPTIMIZER, STATE_RNG = "split-bottom", "split-optimizer", "split-rng"


@dataclass
class _Worker:
    """What one worker process keeps for a node between messages (a cache; context.state is the truth)."""

    round: int
    step: int
    client: ClientSide


_WORKERS: dict[tuple[int, int], _Worker] = {}  # (run id, node id) -> worker cache


@lru_cache(maxsize=64)
def batch_plan(cfg: Config, client_id: int, server_round: int) -> tuple[tuple[int, ...], ...]:
    """The row indices of every step of a round: the batches a federated client of this round trains on."""
    from atlas_flwr.data.tokenize import index_loader

    data = client_data(cfg, client_id)
    loader = index_loader(
        data.train,
        cfg.batch_size,
        shuffle=True,
        seed=seed_for(cfg.seed, client_id, server_round),
        group_by_length=cfg.group_by_length,
    )
    return tuple(tuple(int(i) for i in batch) for _ in range(cfg.epochs_for(data.task)) for batch in loader)


def batch_at(cfg: Config, client_id: int, server_round: int, step: int) -> dict[str, torch.Tensor]:
    """The padded batch of one step."""
    data = client_data(cfg, client_id)
    rows = [data.train[i] for i in batch_plan(cfg, client_id, server_round)[step]]
    return dict(collator(load_tokenizer(cfg.model), cfg.pad_to)(rows))


def _new_client(cfg: Config, task: str, bottom: dict, cut: int) -> ClientSide:
    lora = LoraSettings.from_module_ranks(module_ranks(bottom), cfg.lora_alpha, cfg.lora_dropout)
    model = new_model(cfg, task, lora)
    load_adapter_state(model, to_torch(bottom))
    split = SplitClassifier(model, resolve_model(cfg.model).family, cut)
    split.drop_top()  # the client's memory is its bottom's, as the split memory model assumes
    return ClientSide(split, lr=cfg.lr, weight_decay=cfg.weight_decay, device=pick_device(cfg.device))


def split_step(message: Message, context: Context, cfg: Config, client_id: int) -> Message:
    """Apply the received gradient (if any), then send the next activations or, at the end, the bottom adapter."""
    started = time.perf_counter()
    conf = message.content.config_records["config"]
    server_round, step, cut = int(conf["server-round"]), int(conf["step"]), int(conf["cut"])
    data = client_data(cfg, client_id)
    plan = batch_plan(cfg, client_id, server_round)
    key = (context.run_id, context.node_id)
    # A node another process served since: its entry here (a model, on CUDA device memory) is stale.
    for stale in [k for k, w in _WORKERS.items() if k[0] != key[0] or w.round < server_round]:
        del _WORKERS[stale]
    worker = _WORKERS.get(key)
    if step == 0:
        if "bottom" not in message.content.array_records:
            raise AtlasError("the first split step of a round must carry the bottom adapter")
        bottom = from_record(message.content.array_records["bottom"])
        worker = _Worker(server_round, 0, _new_client(cfg, data.task, bottom, cut))
    elif worker is None or (worker.round, worker.step) != (server_round, step):
        # Another worker ran the previous step: rebuild from context.state.
        if STATE_ADAPTER not in context.state.array_records:
            raise AtlasError(f"split step {step} of round {server_round} arrived before step 0 on this node")
        client = _new_client(cfg, data.task, from_record(context.state.array_records[STATE_ADAPTER]), cut)
        client.load_optimizer_state(from_record(context.state.array_records[STATE_OPTIMIZER]))
        worker = _Worker(server_round, step, client)
    records = message.content.array_records
    # Dropout draws continue from where the server's top left them (the first step: the federated seed).
    rng: Rng = seed_for(cfg.seed, client_id, server_round)
    overflow = False
    if "grad" in records:
        received = from_record(records["grad"])
        overflow = worker.client.backward(
            torch.from_numpy(received["grad"].copy()),
            batch_at(cfg, client_id, server_round, step - 1),
            rng_from(from_record(context.state.array_records[STATE_RNG])),
            scale=float(received["scale"][0]) if "scale" in received else None,
            skip=bool(received["overflow"][0]) if "overflow" in received else False,
        )
        rng = rng_from(received)
    bottom_now = adapter_state(worker.client.split.model)
    context.state.array_records[STATE_ADAPTER] = to_record(bottom_now)
    context.state.array_records[STATE_OPTIMIZER] = to_record(worker.client.optimizer_state())
    metrics = {"client-id": client_id, "steps": len(plan), "overflow": int(overflow)}
    content = RecordDict({"metrics": MetricRecord(metrics)})
    if step < len(plan):
        batch = batch_at(cfg, client_id, server_round, step)
        activations = worker.client.forward(batch, rng)
        context.state.array_records[STATE_RNG] = to_record(rng_arrays(rng))
        content["activations"] = to_record(
            {
                "activations": activations,
                "attention-mask": batch["attention_mask"],
                "labels": batch["labels"],
                **rng_arrays(RngState.now(worker.client.device)),
            }
        )
        worker.step = step + 1
        _WORKERS[key] = worker
    else:
        content["bottom"] = to_record(bottom_now)
        content["metrics"]["num-examples"] = sum(len(b) for b in plan)
        _WORKERS.pop(key, None)
    content["config"] = ConfigRecord({"step": step})
    # The server subtracts this from the round trip to get the messaging overhead of the step.
    content["metrics"]["client-seconds"] = time.perf_counter() - started
    return Message(content, reply_to=message)
