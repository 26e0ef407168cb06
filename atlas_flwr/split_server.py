"""The server's side of split learning: one round of SplitLoRA steps over real Flower messages.

Every group (a learned cluster, a task, or all clients) has one server half: blocks [cut, L),
their LoRA and the group's head. In each step the server sends every client still training a
``train.split`` message with the gradient of its previous activations, and receives the next
activations, mask and labels; it runs the top's forward and backward on them, client by client
in client-id order (so the result does not depend on arrival order). At the end of a round the
clients' bottom adapters are aggregated inside the group (exact ΔW aggregation) and the next
round starts from the merged bottom and the server's top.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from logging import WARNING

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from atlas_flwr.config import Config
from atlas_flwr.errors import AtlasError
from atlas_flwr.fingerprint import layer_of
from atlas_flwr.messaging import exchange
from atlas_flwr.models.split import SplitClassifier
from atlas_flwr.records import from_record, to_record
from atlas_flwr.split_train import ServerSide
from atlas_flwr.train import seed_for
from strategies.aggregation import State
from strategies.pipeline import ClientInfo, aggregate_group


def split_adapter(adapter: State, cut: int) -> tuple[State, State]:
    """The bottom (blocks < cut) and top (blocks >= cut) parts of an adapter state."""
    bottom = {k: v for k, v in adapter.items() if layer_of(k) < cut}
    top = {k: v for k, v in adapter.items() if layer_of(k) >= cut}
    return bottom, top


@dataclass
class SplitGroup:
    """One group's server half and its members."""

    cut: int
    server: ServerSide
    members: list[ClientInfo]


@dataclass
class SplitRoundResult:
    """What a round of split steps produced."""

    bottoms: dict[int, State]
    num_examples: dict[int, int]
    loss: float
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
    grid: Grid, groups: Sequence[SplitGroup], bottoms: dict[int, State], server_round: int, seed: int
) -> SplitRoundResult:
    """Run every client's steps of one round; return their final bottoms (not yet aggregated)."""
    group_of = {c.client_id: g for g in groups for c in g.members}
    clients = sorted((c for g in groups for c in g.members), key=lambda c: c.client_id)
    grads: dict[int, np.ndarray] = {}
    finals: dict[int, State] = {}
    examples: dict[int, int] = {}
    traffic: dict[str, float] = defaultdict(float)
    active = list(clients)
    losses, steps, failures = [], 0, 0
    exchange_s = server_s = client_s = 0.0
    while active:
        messages = []
        for client in active:
            content = RecordDict(
                {
                    "config": ConfigRecord(
                        {"server-round": server_round, "step": steps, "cut": group_of[client.client_id].cut}
                    )
                }
            )
            if steps == 0:
                content["bottom"] = to_record(bottoms[client.client_id])
            if client.client_id in grads:
                content["grad"] = to_record({"grad": grads.pop(client.client_id)})
            message = Message(
                content, dst_node_id=client.node_id, message_type="train.split", group_id=str(server_round)
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
            if "activations" in records:
                arrays = from_record(records["activations"])
                group = group_of[client.client_id]
                grad, loss = group.server.step(
                    torch.from_numpy(arrays["activations"].copy()),
                    torch.from_numpy(arrays["attention-mask"].copy()),
                    torch.from_numpy(arrays["labels"].copy()),
                    seed=seed_for(seed, client.client_id, server_round, steps, 1),
                )
                grads[client.client_id] = grad.numpy()
                losses.append((loss, len(arrays["labels"])))
                still.append(client)
            elif "bottom" in records:
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
    seen = sum(n for _, n in losses)
    return SplitRoundResult(
        bottoms=finals,
        num_examples=examples,
        loss=sum(loss * n for loss, n in losses) / seen if seen else float("nan"),
        steps=steps,
        bytes=dict(traffic),
        failures=failures,
        seconds={"exchange": exchange_s, "server-compute": server_s, "client-compute": client_s},
    )


def merge_bottoms(
    result: SplitRoundResult, groups: Mapping[int, Sequence[int]], alpha: float, method: str = "exact"
) -> dict[int, State]:
    """Aggregate the bottoms inside each aggregation group (client ids); ``none`` keeps each client's own.

    Each client gets the aggregate at its own modules and ranks; a client without a result this round
    gets nothing here (the caller keeps its previous bottom).
    """
    if method == "none":
        return dict(result.bottoms)
    merged: dict[int, State] = {}
    for members in groups.values():
        ids = sorted(i for i in members if i in result.bottoms)
        if ids:
            states = aggregate_group(
                [result.bottoms[i] for i in ids], [result.num_examples[i] for i in ids], alpha, method
            )
            merged.update(zip(ids, states, strict=True))
    return merged


def server_half(
    model: torch.nn.Module, family: str, cut: int, lr: float, head_lr: float, weight_decay: float
) -> ServerSide:
    """A group's server half: the top of ``model`` from ``cut``."""
    return ServerSide(SplitClassifier(model, family, cut), lr=lr, head_lr=head_lr, weight_decay=weight_decay)


@dataclass
class SplitRun:
    """The split-learning state of a run: server halves, each client's bottom, and the cut choices."""

    groups: list[SplitGroup]
    bottoms: dict[int, State]
    choices: list[dict]


def plan_split(
    cfg: Config,
    clients: Sequence[ClientInfo],
    head_groups: Sequence[Hashable],
    states: Mapping[int, tuple[State, State]],
) -> SplitRun:
    """Choose each client's cut (``split = auto``: the deepest that fits its memory; or the given block), and
    build one server half per head group (a group's cut is its members' smallest, so every member fits).

    ``states`` holds each client's adapter and head: at the start of a run they are all the initial state;
    on resume they are the checkpoint's, whose group members share their top and head.
    """
    from atlas_flwr.local import loaded_model, model_shape, train_shape
    from atlas_flwr.models.registry import resolve_model
    from strategies.memory import Calibration, choose_split, split_client_peak_bytes

    shape, step = model_shape(cfg), train_shape(cfg)
    ranks = [cfg.lora_rank] * shape.num_layers
    choices = []
    for client in clients:
        calibration = Calibration.for_device(client.device)
        try:
            if cfg.split == "auto":
                cut, parts = choose_split(shape, step, client.memory_bytes, ranks, calibration=calibration)
            else:
                cut = int(cfg.split)
                parts = split_client_peak_bytes(shape, step, ranks, cut, calibration=calibration)
        except ValueError as err:
            raise AtlasError(f"client {client.client_id} ({client.device_profile}): {err}") from err
        choices.append({"client-id": client.client_id, "cut": cut, "client-predicted-bytes": parts["total"]})
    members: dict[Hashable, list[int]] = defaultdict(list)
    for i, key in enumerate(head_groups):
        members[key].append(i)
    family = resolve_model(cfg.model).family
    groups, bottoms = [], {}
    for indices in members.values():
        cut = min(choices[i]["cut"] for i in indices)
        first = clients[indices[0]]
        _, top = split_adapter(states[first.client_id][0], cut)
        model = loaded_model(cfg, first.task, top, states[first.client_id][1])
        server = server_half(model, family, cut, cfg.lr, cfg.head_lr, cfg.weight_decay)
        groups.append(SplitGroup(cut, server, [clients[i] for i in indices]))
        for i in indices:
            choices[i]["group-cut"] = cut
            bottoms[clients[i].client_id] = split_adapter(states[clients[i].client_id][0], cut)[0]
    return SplitRun(groups, bottoms, choices)


def group_states(group: SplitGroup) -> tuple[State, State]:
    """The top adapter (blocks >= cut) and the head the group's server half holds now."""
    from atlas_flwr.models.classifier import adapter_state, head_state
    from atlas_flwr.records import to_numpy

    model = group.server.split.model
    return to_numpy(adapter_state(model)), to_numpy(head_state(model))
