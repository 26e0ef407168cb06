"""The server's side of split learning: one round of SplitLoRA steps over real Flower messages.

The server holds one half per client during a round (SplitFed-V1): blocks [cut, L), their LoRA
and the head, started from the client's state with fresh AdamW moments, as a federated client
starts its local training. In each step the server sends every client still training a
``train.split`` message with the gradient of its previous activations, and receives the next
activations, mask and labels; it runs that client's top forward and backward on them, in
client-id order (so the result does not depend on arrival order). At the end of a round each
client's bottom (sent back) and top (held here) form one adapter, and the run's strategy folds
them exactly as it folds federated updates: the same aggregation, Laplacian and per-group heads.
Between rounds the server thus keeps one top per cluster or task, and one head per head group.

Why not one shared top per group that steps on every member's batch in turn: it takes as many
steps per round as the group has members, and on the CPU protocol it cost SST-2 3.6 points
against the same run without split; per-client halves make the split run the same computation as
the federated one, with the model cut in two.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from logging import WARNING

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from atlas_flwr.client.fingerprint import layer_of
from atlas_flwr.common.config import Config
from atlas_flwr.common.errors import AtlasError
from atlas_flwr.common.records import from_record, to_record
from atlas_flwr.common.split_train import ServerSide, rng_arrays, rng_from
from atlas_flwr.common.state import State, module_ranks
from atlas_flwr.models.split import SplitClassifier
from atlas_flwr.server.messaging import exchange
from strategies.pipeline import ClientInfo, Update


def split_adapter(adapter: State, cut: int) -> tuple[State, State]:
    """The bottom (blocks < cut) and top (blocks >= cut) parts of an adapter state."""
    bottom = {k: v for k, v in adapter.items() if layer_of(k) < cut}
    top = {k: v for k, v in adapter.items() if layer_of(k) >= cut}
    return bottom, top


@dataclass
class SplitClient:
    """A client in split training: where its model is cut, and its server half."""

    info: ClientInfo
    cut: int
    server: ServerSide

    @property
    def client_id(self) -> int:
        return self.info.client_id


@dataclass
class SplitRoundResult:
    """What a round of split steps produced."""

    bottoms: dict[int, State]
    num_examples: dict[int, int]
    losses: dict[int, float]  # per client, over its examples (the strategy weighs them into the round's)
    steps: int
    bytes: dict[str, float] = field(default_factory=dict)
    failures: int = 0
    seconds: dict[str, float] = field(default_factory=dict)


def _ok(reply: Message | None) -> bool:
    return reply is not None and not reply.has_error() and "metrics" in reply.content.metric_records


def _record_bytes(message: Message, names: Sequence[str]) -> dict[str, int]:
    records = message.content.array_records
    return {name: records[name].count_bytes() for name in names if name in records}


def run_split_round(
    grid: Grid, clients: Sequence[SplitClient], bottoms: dict[int, State], server_round: int
) -> SplitRoundResult:
    """Run every client's steps of one round; return their final bottoms (their tops stay in their halves)."""
    clients = sorted(clients, key=lambda c: c.client_id)
    grads: dict[int, dict[str, np.ndarray]] = {}
    finals: dict[int, State] = {}
    examples: dict[int, int] = {}
    traffic: dict[str, float] = defaultdict(float)
    active = list(clients)
    losses: dict[int, list[tuple[float, int]]] = defaultdict(list)
    steps, failures = 0, 0
    exchange_s = server_s = client_s = 0.0
    while active:
        messages = []
        for client in active:
            content = RecordDict(
                {"config": ConfigRecord({"server-round": server_round, "step": steps, "cut": client.cut})}
            )
            if steps == 0:
                content["bottom"] = to_record(bottoms[client.client_id])
            if client.client_id in grads:
                content["grad"] = to_record(grads.pop(client.client_id))
            message = Message(
                content, dst_node_id=client.info.node_id, message_type="train.split", group_id=str(server_round)
            )
            for name, size in _record_bytes(message, ("bottom", "grad")).items():
                traffic[{"bottom": "adapters-down", "grad": "gradients-down"}[name]] += size
            messages.append(message)
        t0 = time.perf_counter()
        replies = exchange(grid, messages)
        exchange_s += time.perf_counter() - t0
        # Clients compute concurrently (one worker each at best): the slowest one bounds the step.
        client_s += max(
            (float(r.content.metric_records["metrics"].get("client-seconds", 0.0)) for r in replies if _ok(r)),
            default=0.0,
        )
        still = []
        t1 = time.perf_counter()
        for client, reply in zip(active, replies, strict=True):
            if reply is None or reply.has_error():
                failures += 1
                reason = "no reply" if reply is None else reply.error.reason.splitlines()[0]
                log(
                    WARNING,
                    "round %d split step %d: client %d dropped: %s",
                    server_round,
                    steps,
                    client.client_id,
                    reason,
                )
                continue
            records = reply.content.array_records
            for name, size in _record_bytes(reply, ("activations", "bottom")).items():
                traffic[{"activations": "activations-up", "bottom": "adapters-up"}[name]] += size
            # Whether the client's half overflowed in the step its message just applied (fp16 on CUDA).
            client_overflow = bool(reply.content.metric_records["metrics"].get("overflow", 0))
            if "activations" in records:
                arrays = from_record(records["activations"])
                half = client.server
                grad, loss = half.step(
                    torch.from_numpy(arrays["activations"].copy()),
                    torch.from_numpy(arrays["attention-mask"].copy()),
                    torch.from_numpy(arrays["labels"].copy()),
                    # Dropout continues from the client's bottom; the client's next forward from here.
                    seed=rng_from(arrays),
                    client_overflow=client_overflow,
                )
                grads[client.client_id] = {"grad": grad.cpu().numpy(), **rng_arrays(half.next_rng)}
                if half.loss_scale.enabled:
                    grads[client.client_id] |= {
                        "scale": np.array([half.loss_scale.scale]),
                        "overflow": np.array([int(half.overflowed)]),
                    }
                losses[client.client_id].append((loss, len(arrays["labels"])))
                still.append(client)
            elif "bottom" in records:
                client.server.settle(client_overflow)  # the round's last step
                finals[client.client_id] = from_record(records["bottom"])
                examples[client.client_id] = int(reply.content.metric_records["metrics"]["num-examples"])
            else:
                raise AtlasError(
                    f"client {client.client_id} replied to a split step with neither activations nor bottom"
                )
        server_s += time.perf_counter() - t1
        active = still
        steps += 1
    if not finals:
        raise AtlasError(f"round {server_round}: every client failed in split training; see the warnings above")
    per_client = {
        cid: sum(loss * n for loss, n in pairs) / sum(n for _, n in pairs) for cid, pairs in losses.items() if pairs
    }
    return SplitRoundResult(
        bottoms=finals,
        num_examples=examples,
        losses=per_client,
        steps=steps,
        bytes=dict(traffic),
        failures=failures,
        seconds={"exchange": exchange_s, "server-compute": server_s, "client-compute": client_s},
    )


def round_updates(clients: Sequence[SplitClient], result: SplitRoundResult) -> list[Update]:
    """Each finished client's whole adapter (its bottom and its half's top) and head, as a federated update."""
    from atlas_flwr.common.records import to_numpy
    from atlas_flwr.models.classifier import adapter_state, head_state

    updates = []
    for client in sorted(clients, key=lambda c: c.client_id):
        cid = client.client_id
        if cid not in result.bottoms:
            continue
        if client.server.pending:
            raise AtlasError(f"client {cid}'s server half has a step not taken: settle() it before reading its top")
        model = client.server.split.model
        top = split_adapter(to_numpy(adapter_state(model)), client.cut)[1]
        updates.append(
            Update(
                cid,
                {**result.bottoms[cid], **top},
                to_numpy(head_state(model)),
                result.num_examples[cid],
                {"train-loss": result.losses.get(cid, float("nan"))},
            )
        )
    return updates


def start_round(clients: Sequence[SplitClient], states: Mapping[int, tuple[State, State]]) -> dict[int, State]:
    """Restart every half from its client's adapter top and head; return the bottoms to send."""
    bottoms = {}
    for client in clients:
        adapter, head = states[client.client_id]
        bottom, top = split_adapter(adapter, client.cut)
        client.server.restart(top, head)
        bottoms[client.client_id] = bottom
    return bottoms


def server_half(
    model: torch.nn.Module, family: str, cut: int, lr: float, head_lr: float, weight_decay: float, client_device: str
) -> ServerSide:
    """A server half: the top of ``model`` from ``cut``.

    It computes where its client's bottom does: on CUDA (fp16 autocast, one loss scale across the cut) for
    a client that trains on CUDA, when this process has a GPU; else on the CPU. A CUDA client's loss is
    scaled wherever the top runs, because its bottom's fp16 backward needs it."""
    device = torch.device("cuda" if client_device == "cuda" and torch.cuda.is_available() else "cpu")
    return ServerSide(
        SplitClassifier(model, family, cut),
        lr=lr,
        head_lr=head_lr,
        weight_decay=weight_decay,
        device=device,
        loss_scaling=client_device == "cuda",
    )


def _layer_ranks(adapter: State, num_layers: int) -> list[int]:
    """Each layer's largest module rank in ``adapter`` (0: not adapted)."""
    ranks = [0] * num_layers
    for module, rank in module_ranks(adapter).items():
        ranks[layer_of(module)] = max(ranks[layer_of(module)], rank)
    return ranks


def plan_split(
    cfg: Config,
    clients: Sequence[ClientInfo],
    states: Mapping[int, tuple[State, State]],
    cuts: Mapping[int, int] | None = None,
) -> tuple[list[SplitClient], list[dict]]:
    """Choose each client's cut (``split = auto``: the deepest that fits its memory; or the given block) and
    build its server half; return them with one row per client for the run's ``split`` table.

    A client in ``cuts`` keeps the cut its rank plan chose (budget ranks), priced at its own ranks."""
    from atlas_flwr.client.local import loaded_model
    from atlas_flwr.models.registry import resolve_model
    from atlas_flwr.server.shapes import model_shape, train_shape
    from strategies.memory import Calibration
    from strategies.split_cut import choose_split, split_client_peak_bytes

    shape, step = model_shape(cfg), train_shape(cfg)
    ranks = [cfg.lora_rank] * shape.num_layers
    family = resolve_model(cfg.model).family
    planned, choices = [], []
    for client in clients:
        calibration = Calibration.for_device(client.device)
        try:
            if cuts and client.client_id in cuts:
                cut = cuts[client.client_id]
                held = _layer_ranks(states[client.client_id][0], shape.num_layers)
                parts = split_client_peak_bytes(shape, step, held, cut, calibration=calibration)
            elif cfg.split == "auto":
                cut, parts = choose_split(shape, step, client.memory_bytes, ranks, calibration=calibration)
            else:
                cut = int(cfg.split)
                parts = split_client_peak_bytes(shape, step, ranks, cut, calibration=calibration)
        except ValueError as err:
            raise AtlasError(f"client {client.client_id} ({client.device_profile}): {err}") from err
        adapter, head = states[client.client_id]
        model = loaded_model(cfg, client.task, split_adapter(adapter, cut)[1], head)
        server = server_half(model, family, cut, cfg.lr, cfg.head_lr, cfg.weight_decay, client.device)
        planned.append(SplitClient(client, cut, server))
        choices.append(
            {
                "client-id": client.client_id,
                "cut": cut,
                "client-predicted-bytes": parts["total"],
                "memory-budget-bytes": client.memory_bytes,
            }
        )
    return planned, choices
