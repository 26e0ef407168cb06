"""ServerApp: the round loop. Messages in and out here; the math lives in ``strategies/``."""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from logging import ERROR, INFO, WARNING
from pathlib import Path
from typing import Any

import flwr
import numpy as np
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from atlas_flwr.checkpoint import Checkpoint, checkpoint_to_resume, save_checkpoint
from atlas_flwr.codec import decode_update, held_by_client, to_wire_record
from atlas_flwr.common.state import LORA_A_SUFFIX, State, module_ranks, state_digest
from atlas_flwr.config import Config
from atlas_flwr.data import task_spec
from atlas_flwr.dp import run_epsilon
from atlas_flwr.errors import AtlasError
from atlas_flwr.eurosat.server import run_eurosat
from atlas_flwr.local import initial_state, modules_per_layer
from atlas_flwr.messaging import exchange
from atlas_flwr.preflight import preflight
from atlas_flwr.quiet import quiet_libraries
from atlas_flwr.records import from_record, message_bytes, to_numpy
from atlas_flwr.results import RunWriter, default_run_name, new_run_dir
from atlas_flwr.shapes import model_shape, train_shape
from atlas_flwr.split_server import (
    SPLIT_DEVICE,
    SplitClient,
    plan_split,
    round_updates,
    run_split_round,
    start_round,
)
from atlas_flwr.train import seed_for
from strategies.aggregation import energy_by_slice
from strategies.clustering import adjusted_rand
from strategies.memory import Calibration, ModelShape, TrainShape, allocate_ranks, predict_peak_bytes
from strategies.pipeline import (
    ClientInfo,
    Member,
    PersonalizedPipeline,
    Switches,
    Update,
    fingerprint_graph,
    plan_groups,
    plan_ranks,
    resolve_switches,
)

quiet_libraries()
app = ServerApp()

#: Serialisation overhead allowed on top of the raw bytes of the tensors sent (ArrayRecord headers).
REPLY_SLACK_BYTES = 64 * 1024


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Validate the config, then run the federation.

    A user error is logged as one line, then re-raised so that Flower marks the run
    ``finished:failed`` with that line as the status details.
    """
    try:
        cfg = Config.from_run_config(context.run_config)
        if cfg.workload == "eurosat":
            run_eurosat(grid, cfg)
            return
        run_federation(grid, cfg)
    except AtlasError as err:
        log(ERROR, "%s", err)
        raise


def _reply_error(reply: Message | None) -> str | None:
    if reply is None:
        return "no reply before the timeout"
    if reply.has_error():
        return f"error {reply.error.code}: {reply.error.reason}".splitlines()[0]
    return None


def describe_clients(grid: Grid, cfg: Config) -> list[ClientInfo]:
    """Ask every node who it is; check the population is tasks x clients-per-task."""
    node_ids = sorted(grid.get_node_ids())
    messages = [Message(RecordDict(), dst_node_id=n, message_type="query.describe", group_id="0") for n in node_ids]
    clients = []
    for node_id, reply in zip(node_ids, exchange(grid, messages), strict=True):
        if (reason := _reply_error(reply)) is not None:
            raise AtlasError(f"node {node_id} failed to describe itself: {reason}")
        record = reply.content.config_records["client"]
        clients.append(
            ClientInfo(
                client_id=int(record["client-id"]),
                node_id=node_id,
                task=str(record["task"]),
                num_train=int(record["num-train"]),
                num_eval=int(record["num-eval"]),
                eval_digest=str(record.get("eval-digest", "")),
                device_profile=str(record.get("device-profile", "")),
                memory_bytes=int(record.get("memory-bytes", 0)),
                max_rank=int(record.get("max-rank", 0)),
                device=str(record.get("device", "cpu")),
            )
        )
    ids = sorted(c.client_id for c in clients)
    if ids != list(range(cfg.num_clients)):
        raise AtlasError(
            f"client ids {ids} do not cover 0..{cfg.num_clients - 1} (tasks x clients-per-task = {cfg.num_clients}): "
            f"run with num-supernodes = {cfg.num_clients}"
        )
    return sorted(clients, key=lambda c: c.client_id)


def _content(
    strategy: PersonalizedPipeline, client: ClientInfo, server_round: int, precision: str = "fp32"
) -> RecordDict:
    adapter, head = strategy.state_for(client.client_id)
    # Modules the client uses but must not train (its budget does not cover them), comma-joined.
    frozen = ",".join(sorted(strategy.frozen[client.client_id]))
    return RecordDict(
        {
            "adapter": to_wire_record(adapter, precision),
            "head": to_wire_record(head, precision),
            "config": ConfigRecord({"server-round": server_round, "frozen-modules": frozen}),
        }
    )


def _send(
    grid: Grid,
    clients: Sequence[ClientInfo],
    strategy: PersonalizedPipeline,
    kind: str,
    server_round: int,
    timeout: float | None = None,
    precision: str = "fp32",
) -> tuple[list[tuple[ClientInfo, Message]], dict[str, float]]:
    messages = [
        Message(
            _content(strategy, c, server_round, precision),
            dst_node_id=c.node_id,
            message_type=kind,
            group_id=str(server_round),
        )
        for c in clients
    ]
    sent = sum(message_bytes(m) for m in messages)
    replies = exchange(grid, messages, timeout=timeout)
    ok, received, failures = [], 0, 0
    for client, reply in zip(clients, replies, strict=True):
        if (reason := _reply_error(reply)) is not None:
            failures += 1
            log(
                WARNING,
                "round %d %s: client %d (%s) failed: %s",
                server_round,
                kind,
                client.client_id,
                client.task,
                reason,
            )
            continue
        received += message_bytes(reply)
        ok.append((client, reply))
    if not ok:
        raise AtlasError(f"round {server_round}: every client failed in '{kind}'; see the warnings above")
    return ok, {"bytes-sent": float(sent), "bytes-received": float(received), "failures": float(failures)}


def evaluation_groups(
    clients: Sequence[ClientInfo], strategy: PersonalizedPipeline
) -> dict[ClientInfo, list[ClientInfo]]:
    """Clients that would evaluate the same model on the same rows, keyed by the one that does.

    Under FedAvg the clients of a task hold the same adapter, the same head and the same
    validation rows, so their metrics are identical: one evaluation serves them all. Models
    are compared by content digest; rows by the describe digest.
    """
    groups: dict[tuple, list[ClientInfo]] = {}
    for client in clients:
        adapter, head = strategy.state_for(client.client_id)
        key = (state_digest(adapter, head), client.eval_digest or f"client-{client.client_id}")
        groups.setdefault(key, []).append(client)
    return {members[0]: members for members in groups.values()}


def decode_train_reply(client: ClientInfo, msg: Message, sent: tuple[State, State], precision: str = "fp32") -> Update:
    """Decode a train reply; raise ValueError (one line) if it cannot be aggregated.

    Missing or unexpected records, a payload larger than the sent state (every record counted), keys
    or shapes that differ from what was ``sent`` (a LoRA rank above the assigned one among them), NaN
    or infinite values, and a ``num-examples`` outside 1 .. the rows the client described are refused
    here, so they never reach the aggregate; so is a reply that fails to decode at all. ``sent`` is
    what the client holds (the decoded download); in fp16 and int8 the reply is an update relative to it.
    """
    try:
        return _decode_train_reply(client, msg, sent, precision)
    except (TypeError, OverflowError, KeyError, IndexError, AttributeError) as err:
        raise ValueError(f"reply does not decode: {type(err).__name__}: {err}".splitlines()[0]) from err


def _decode_train_reply(client: ClientInfo, msg: Message, sent: tuple[State, State], precision: str) -> Update:
    content = msg.content
    missing = [n for n in ("adapter", "head") if n not in content.array_records]
    if missing or "metrics" not in content.metric_records:
        raise ValueError(f"missing records {missing or ['metrics']}")
    extra = sorted(set(content.array_records) - {"adapter", "head"}) + sorted(set(content.metric_records) - {"metrics"})
    if extra or content.config_records:
        raise ValueError(f"unexpected records {(extra + sorted(content.config_records))[:3]}")
    # Checked before decoding: the reply holds exactly the tensors sent (and its metrics), so anything larger
    # is not an update. Every record counts, so no payload can ride along in metrics.
    limit = sum(v.nbytes for state in sent for v in state.values()) + REPLY_SLACK_BYTES
    size = message_bytes(msg) + sum(r.count_bytes() for r in content.metric_records.values())
    if size > limit:
        raise ValueError(f"payload of {size} bytes exceeds the {limit} bytes an update of the sent shapes takes")
    metrics = dict(content.metric_records["metrics"])
    count = metrics.get("num-examples")
    # The weight a client gets in the average is bounded by the rows it described before round 1.
    if not isinstance(count, int | float) or not np.isfinite(count) or not 0 < count <= client.num_train:
        raise ValueError(f"num-examples = {count!r}: expected a count in 1..{client.num_train} (its described rows)")
    decoded = []
    for name, reference in (("adapter", sent[0]), ("head", sent[1])):
        try:
            decoded.append(decode_update(content.array_records[name], reference, precision))
        except ValueError as err:
            raise ValueError(f"{name} {err}") from err
    adapter, head = decoded
    for name, state, reference in (("adapter", adapter, sent[0]), ("head", head, sent[1])):
        if set(state) != set(reference):
            diff = sorted(set(state) ^ set(reference))
            raise ValueError(f"{name} keys differ from those sent: {diff[:3]}")
        for k in (k for k in state if k.endswith(LORA_A_SUFFIX)):
            if state[k].shape[0] > reference[k].shape[0]:
                raise ValueError(
                    f"{name} tensor {k!r} has rank {state[k].shape[0]}: above the assigned {reference[k].shape[0]}"
                )
        shapes = [k for k in state if state[k].shape != reference[k].shape]
        if shapes:
            k = shapes[0]
            raise ValueError(f"{name} tensor {k!r} has shape {state[k].shape}: expected {reference[k].shape}")
        bad = [k for k, v in state.items() if not np.isfinite(v).all()]
        if bad:
            raise ValueError(f"{name} tensor {bad[0]!r} holds NaN or Inf")
    return Update(client.client_id, adapter, head, int(metrics["num-examples"]), metrics)


def _task_means(evals: dict[int, dict[str, float]], clients: Sequence[ClientInfo]) -> dict[str, float]:
    by_task: dict[str, list[dict[str, float]]] = defaultdict(list)
    for c in clients:
        if c.client_id in evals:
            by_task[c.task].append(evals[c.client_id])
    out: dict[str, float] = {}
    for task, rows in sorted(by_task.items()):
        for metric in ("accuracy", "f1", "mcc"):
            out[f"{task}-{metric}"] = float(np.mean([r[metric] for r in rows]))
    out["mean-main-metric"] = float(np.mean([out[f"{t}-{task_spec(t).main_metric}"] for t in by_task]))
    return out


def _round_line(server_round: int, total: int, row: dict[str, Any], tasks: Sequence[str]) -> str:
    parts = [f"round {server_round}/{total}", f"train loss {row['train-loss']:.4f}"]
    for t in tasks:
        metric = task_spec(t).main_metric
        if f"{t}-{metric}" in row:
            parts.append(f"{t} {metric} {row[f'{t}-{metric}']:.3f}")
    parts.append(f"down {row['bytes-sent'] / 1e6:.2f} MB up {row['bytes-received'] / 1e6:.2f} MB")
    parts.append(f"{row['round-seconds']:.1f} s")
    return " | ".join(parts)


@dataclass(frozen=True)
class Fingerprints:
    """Every client's fingerprint reply, in client order."""

    vectors: np.ndarray
    importance: list[np.ndarray]
    epsilon: float | None  # None: no noise
    delta: float
    rows: list[int]


def collect_fingerprints(grid: Grid, clients: Sequence[ClientInfo]) -> Fingerprints:
    """Send ``query.fingerprint`` to every client; every one must answer (clustering needs all)."""
    messages = [
        Message(RecordDict(), dst_node_id=c.node_id, message_type="query.fingerprint", group_id="0") for c in clients
    ]
    vectors, importance, eps, rows = [], [], [], []
    delta = 0.0
    for client, reply in zip(clients, exchange(grid, messages), strict=True):
        if (reason := _reply_error(reply)) is not None:
            raise AtlasError(f"client {client.client_id} failed to send its fingerprint: {reason}")
        arrays = from_record(reply.content.array_records["fingerprint"])
        metrics = reply.content.metric_records["metrics"]
        vector = np.asarray(arrays["vector"], dtype=np.float64)
        if vector.ndim != 1 or not np.isfinite(vector).all() or not np.any(vector):
            raise AtlasError(f"client {client.client_id} sent a fingerprint that is not a finite non-zero vector")
        vectors.append(vector)
        importance.append(np.asarray(arrays["importance"], dtype=np.float64))
        eps.append(float(metrics["epsilon"]))
        rows.append(int(metrics["num-rows"]))
        delta = float(metrics["delta"])
    if len({v.shape for v in vectors}) != 1:
        raise AtlasError(f"fingerprints have different sizes: {sorted({v.shape[0] for v in vectors})}")
    epsilon = None if all(e < 0 for e in eps) else max(eps)
    return Fingerprints(np.stack(vectors), importance, epsilon, delta, rows)


@dataclass(frozen=True)
class Plan:
    """What the server decides before round 1: groups, graph, each client's starting state and ranks."""

    members: list[Member]
    initial: dict[int, tuple[State, State]]
    adjacency: np.ndarray | None
    clusters: dict[str, Any]
    ranks: list[dict[str, Any]]
    frozen: dict[int, list[str]]  # per client, the modules it holds and uses but does not train
    dropped: list[int] = field(default_factory=list)  # clients that sit out training (over-budget = drop)


def plan_federation(grid: Grid, cfg: Config, clients: Sequence[ClientInfo], switches: Switches) -> Plan:
    """Phase 1 (fingerprints, groups, graph) and phase 2 (ranks under each client's memory budget)."""
    prints = collect_fingerprints(grid, clients) if switches.needs_fingerprints else None
    tasks = [c.task for c in clients]
    groups, result = plan_groups(
        switches.clustering, tasks, None if prints is None else prints.vectors, cfg.cluster_k_max, cfg.seed
    )
    clusters: dict[str, Any] = {"clustering": switches.clustering, "groups": groups, "k": len(set(groups))}
    if result is not None:
        clusters |= result.to_dict()
    clusters["ari-vs-declared-tasks"] = adjusted_rand(tasks, groups) if len(set(tasks)) > 1 else None
    if prints is not None:
        clusters["fingerprint"] = {
            "kind": cfg.fingerprint_kind,
            "rows": prints.rows,
            "noise": cfg.fingerprint_noise,
            "epsilon": prints.epsilon,
            "delta": prints.delta if prints.epsilon is not None else None,
        }
    # Recorded for every method that has fingerprints; only the Laplacian uses it.
    adjacency = fingerprint_graph(prints.vectors) if prints is not None else None

    uniform = tuple(to_numpy(t) for t in initial_state(cfg))
    shape, step = model_shape(cfg), train_shape(cfg)
    layers = modules_per_layer(uniform[0])
    initial: dict[int, tuple[State, State]] = {}
    frozen: dict[int, list[str]] = {}
    dropped: list[int] = []
    rank_rows: list[dict[str, Any]] = []
    built: dict[tuple, tuple[State, State]] = {}
    common = _common_ranks(cfg, clients, shape, step) if switches.ranks == "common" else None
    for i, client in enumerate(clients):
        trains_on, cap = _trains_on(cfg, client), _rank_cap(cfg, client)
        calibration = Calibration.for_device(trains_on)
        row: dict[str, Any] = {
            "client-id": client.client_id,
            "task": client.task,
            "device": client.device_profile,
            "trains-on": trains_on,
            "memory-budget-bytes": client.memory_bytes,
            "max-rank": cap,
        }
        importance = None
        if switches.ranks == "budget":
            importance, plan_kind = list(prints.importance[i]), "budget"
        elif switches.ranks == "common":
            plan_kind = "common"
        else:
            uniform_peak = predict_peak_bytes(shape, step, [cfg.lora_rank] * shape.num_layers, calibration=calibration)
            fits = (client.memory_bytes == 0 or uniform_peak["total"] <= client.memory_bytes) and cap >= cfg.lora_rank
            # Split learning answers the memory budget with its cut, and the centralized reference has no device.
            exempt = cfg.over_budget == "train" or switches.pooled or cfg.split != "none"
            plan_kind = "uniform" if fits or exempt else cfg.over_budget
            if plan_kind == "shrink":  # the budget allocator without fingerprints: every layer weighs the same
                importance = [1.0] * shape.num_layers
        if importance is not None or plan_kind == "common":
            frozen_rank = cap if cfg.frozen_layers == "use" and plan_kind != "common" else 0
            try:
                if plan_kind == "common":
                    ranks = list(common)
                    pattern = {m: r for layer, r in zip(layers, ranks, strict=True) if r for m in layer}
                    predicted, binding = predict_peak_bytes(shape, step, ranks, calibration=calibration)["total"], None
                else:
                    allocation, pattern = plan_ranks(
                        shape, step, client.memory_bytes, importance, layers, cap, calibration, frozen_rank
                    )
                    ranks, predicted, binding = allocation.ranks, allocation.predicted["total"], allocation.binding
            except ValueError as err:
                raise AtlasError(f"client {client.client_id} ({client.device_profile}): {err}") from err
            # What the budget cannot train is held at the client's cap, frozen (frozen-layers = use), or dropped.
            held = {m: pattern.get(m, frozen_rank) for layer in layers for m in layer if m in pattern or frozen_rank}
            frozen[client.client_id] = sorted(set(held) - set(pattern))
            key = tuple(sorted(held.items()))
            if key not in built:
                built[key] = tuple(to_numpy(t) for t in initial_state(cfg, held))
            initial[client.client_id] = built[key]
        else:
            initial[client.client_id] = uniform
            ranks = [cfg.lora_rank] * shape.num_layers
            predicted, binding = uniform_peak["total"], None
            if plan_kind == "drop":
                dropped.append(client.client_id)
        row |= {
            "plan": plan_kind,
            "ranks-per-layer": " ".join(map(str, ranks)),
            "adapter-params": int(sum(v.size for v in initial[client.client_id][0].values())),
            "predicted-peak-bytes": int(predicted),
            "fits-budget": bool(plan_kind == "drop" or client.memory_bytes == 0 or predicted <= client.memory_bytes),
            "budget-binds": binding,
            "frozen-modules": len(frozen.get(client.client_id, ())),
        }
        if prints is not None:
            row["importance"] = " ".join(f"{x:.3g}" for x in prints.importance[i])
        rank_rows.append(row)
    members = [Member(c.client_id, c.task, g) for c, g in zip(clients, groups, strict=True)]
    return Plan(members, initial, adjacency, clusters, rank_rows, frozen, dropped)


def _trains_on(cfg: Config, client: ClientInfo) -> str:
    """Where a client's training step runs: split halves compute on SPLIT_DEVICE, else its own device."""
    return SPLIT_DEVICE if cfg.split != "none" else client.device


def _rank_cap(cfg: Config, client: ClientInfo) -> int:
    """The highest rank a client may train: ``lora-rank``, lowered by its device's rank cap (0: none)."""
    return min(cfg.lora_rank, client.max_rank or cfg.lora_rank)


def _common_ranks(cfg: Config, clients: Sequence[ClientInfo], shape: ModelShape, step: TrainShape) -> list[int]:
    """Homogeneous LoRA's plan: per layer the smallest of every client's equal-importance plan.

    Each client's plan fits its device and the peak only grows with any layer's rank, so the
    element-wise minimum fits every client.
    """
    plans = []
    for client in clients:
        cap, calibration = _rank_cap(cfg, client), Calibration.for_device(_trains_on(cfg, client))
        try:
            allocation = allocate_ranks(
                shape, step, client.memory_bytes, [1.0] * shape.num_layers, max_rank=cap, calibration=calibration
            )
        except ValueError as err:
            raise AtlasError(f"client {client.client_id} ({client.device_profile}): {err}") from err
        plans.append(allocation.ranks)
    ranks = [min(layer) for layer in zip(*plans, strict=True)]
    if not any(ranks):
        raise AtlasError(
            "ranks = common: no layer is adapted by every client's plan; raise device-scale or lower batch-size"
        )
    return ranks


def rank_energy(strategy: PersonalizedPipeline, server_round: int, alpha: float) -> list[dict[str, Any]]:
    """Per client, the share of its adapter's energy in rank slices 1, 2, 3-4, 5-8, ... (rank collapse watch)."""
    top = max((r for i in strategy.adapters for r in module_ranks(strategy.adapters[i]).values()), default=1)
    edges = [1 << k for k in range(max(top - 1, 0).bit_length() + 1)]
    names = [
        f"energy-{lo + 1}-{hi}" if hi > lo + 1 else f"energy-{hi}"
        for lo, hi in zip([0, *edges[:-1]], edges, strict=True)
    ]
    rows = []
    for member in strategy.members:
        adapter = strategy.adapters[member.client_id]
        ranks = module_ranks(adapter).values()
        shares = energy_by_slice(adapter, alpha, edges)
        rows.append(
            {
                "round": server_round,
                "client-id": member.client_id,
                "group": member.group,
                "max-rank": max(ranks, default=0),
                **dict(zip(names, shares, strict=True)),
            }
        )
    return rows


def dp_summary(cfg: Config, fingerprints: bool, rounds: int) -> dict[str, Any] | None:
    """(epsilon, delta) of a run's DP on updates, alone and with the fingerprint release; None when off.

    Epsilon is null where it is unbounded (a release without noise).
    """
    if cfg.dp_clip <= 0:
        return None
    updates = run_epsilon([cfg.dp_noise] * rounds, cfg.fingerprint_delta)
    total = run_epsilon(
        [cfg.dp_noise] * rounds + ([cfg.fingerprint_noise] if fingerprints else []), cfg.fingerprint_delta
    )
    return {
        "clip": cfg.dp_clip,
        "noise": cfg.dp_noise,
        "delta": cfg.fingerprint_delta,
        "rounds": rounds,
        "epsilon-updates": updates if np.isfinite(updates) else None,
        "epsilon-with-fingerprint": total if np.isfinite(total) else None,
    }


def collect_updates(
    ok: Sequence[tuple[ClientInfo, Message]], strategy: PersonalizedPipeline, server_round: int, precision: str = "fp32"
) -> tuple[list[Update], int]:
    """Decode the train replies that can be aggregated; log and count the rejected ones."""
    updates, rejected = [], 0
    for client, msg in ok:
        adapter, head = strategy.state_for(client.client_id)
        # A client sends back only what it trains: its frozen modules are not part of its update.
        held = tuple(held_by_client(s, precision) for s in (strategy.trained_part(client.client_id, adapter), head))
        try:
            updates.append(decode_train_reply(client, msg, held, precision))
        except ValueError as err:
            rejected += 1
            log(WARNING, "round %d train: reply of client %d rejected: %s", server_round, client.client_id, err)
    return updates, rejected


def _train_federated(
    grid: Grid,
    cfg: Config,
    clients: Sequence[ClientInfo],
    strategy: PersonalizedPipeline,
    server_round: int,
    last_train: dict[int, dict[str, float]],
) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """Train messages to every client, validated replies folded into the strategy."""
    timeout = cfg.reply_timeout_seconds or None
    pool = set(strategy.trainers())
    trainers = set(strategy.sample(cfg.fraction_train, cfg.min_train_nodes, seed_for(cfg.seed, server_round, 0x5A)))
    clients = [c for c in clients if c.client_id in trainers]
    ok, train_io = _send(grid, clients, strategy, "train", server_round, timeout, cfg.precision)
    t1 = time.perf_counter()
    replies, rejected = collect_updates(ok, strategy, server_round, cfg.precision)
    train_io["failures"] += rejected
    train_io["rejected"] = float(rejected)
    needed = min(cfg.min_clients, len(clients))
    if len(replies) < needed:
        raise AtlasError(
            f"round {server_round}: {len(replies)} valid train replies of {len(clients)}, fewer than "
            f"min-clients = {cfg.min_clients}; see the warnings above"
        )
    last_train.update({r.client_id: r.metrics for r in replies})
    metrics = strategy.aggregate_train(replies, sat_out=pool - trainers)
    metrics["sampled"] = float(len(trainers))
    # The clients' own training time, summed: what the train phase costs beyond it is messaging and dispatch.
    compute = float(sum(r.metrics.get("train-seconds", 0.0) for r in replies))
    return metrics, train_io, {"aggregate-seconds": time.perf_counter() - t1, "client-train-seconds": compute}


def _train_split(
    grid: Grid,
    cfg: Config,
    split: Sequence[SplitClient],
    strategy: PersonalizedPipeline,
    server_round: int,
    last_train: dict[int, dict[str, float]],
) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """One round of split steps; each client's bottom and top are folded by the strategy like a federated
    update."""
    bottoms = start_round(split, {c.client_id: strategy.state_for(c.client_id) for c in split})
    result = run_split_round(grid, split, bottoms, server_round)
    t0 = time.perf_counter()
    updates = round_updates(split, result)
    needed = min(cfg.min_clients, len(split))
    if len(updates) < needed:
        raise AtlasError(
            f"round {server_round}: {len(updates)} clients finished split training of {len(split)}, fewer than "
            f"min-clients = {cfg.min_clients}; see the warnings above"
        )
    last_train.update({u.client_id: u.metrics for u in updates})
    metrics = strategy.aggregate_train(updates)
    b = result.bytes
    io = {
        "bytes-sent": b.get("adapters-down", 0.0) + b.get("gradients-down", 0.0),
        "bytes-received": b.get("activations-up", 0.0) + b.get("adapters-up", 0.0),
        "failures": float(result.failures),
    }
    extra = {f"split-{k}-bytes": v for k, v in sorted(b.items())}
    extra |= {
        "split-steps": float(result.steps),
        "split-exchange-seconds": result.seconds["exchange"],
        "split-server-seconds": result.seconds["server-compute"],
        "split-client-seconds": result.seconds["client-compute"],
        # Round trips minus the clients' own work: what the messages cost.
        "split-overhead-seconds": result.seconds["exchange"] - result.seconds["client-compute"],
        "aggregate-seconds": time.perf_counter() - t0,
    }
    return metrics, io, extra


@dataclass(frozen=True)
class RunOutcome:
    """Where a run wrote its results, and the strategy with its final per-client states."""

    run_dir: Path
    strategy: PersonalizedPipeline


def _plan_from_checkpoint(ckpt: Checkpoint, clients: Sequence[ClientInfo]) -> Plan:
    """The plan a checkpointed run made, with every client's state as it was after the checkpoint's round."""
    meta = ckpt.meta
    members = [Member(int(m["client-id"]), str(m["task"]), int(m["group"])) for m in meta["members"]]
    saved = sorted((m.client_id, m.task) for m in members)
    now = sorted((c.client_id, c.task) for c in clients)
    if saved != now:
        raise AtlasError(f"resume-from: the checkpoint's clients {saved} differ from the connected ones {now}")
    initial = {m.client_id: (ckpt.adapters.get(m.client_id, {}), ckpt.heads[m.client_id]) for m in members}
    adjacency = None if meta["adjacency"] is None else np.asarray(meta["adjacency"], dtype=np.float64)
    frozen = {int(k): list(v) for k, v in meta.get("frozen", {}).items()}
    return Plan(members, initial, adjacency, meta["clusters"], meta["ranks"], frozen, meta.get("dropped", []))


def _checkpoint_meta(
    cfg: Config,
    plan: Plan,
    evals: dict[int, dict[str, float]],
    last_train: dict[int, dict[str, float]],
    writer: RunWriter,
    plan_seconds: float,
) -> dict[str, Any]:
    return {
        "run-config": cfg.to_dict(),
        "members": [{"client-id": m.client_id, "task": m.task, "group": m.group} for m in plan.members],
        "clusters": plan.clusters,
        "ranks": plan.ranks,
        "frozen": {str(k): v for k, v in plan.frozen.items()},
        "dropped": plan.dropped,
        "adjacency": None if plan.adjacency is None else plan.adjacency.tolist(),
        "evals": {str(k): v for k, v in evals.items()},
        "last-train": {str(k): v for k, v in last_train.items()},
        "rounds": writer.rounds,
        "plan-seconds": plan_seconds,
    }


def run_federation(grid: Grid, cfg: Config) -> RunOutcome:
    """Describe, plan (fingerprints, groups, ranks), then ``num-server-rounds`` rounds of train, aggregate,
    evaluate; a checkpoint after every round.

    With ``resume-from`` the plan and every client's state come from the checkpoint, results go on
    in the checkpointed run's directory, and the rounds after the checkpoint's run as they would have.
    """
    started = time.perf_counter()
    preflight(cfg)
    ckpt = checkpoint_to_resume(cfg.resume_from, cfg.to_dict())
    if ckpt is not None:
        run_dir = ckpt.run_dir
    else:
        run_dir = new_run_dir(cfg.resolved_output_dir(), cfg.run_name or default_run_name(cfg.strategy, cfg.seed))
    config_json: dict[str, Any] = {"run-config": cfg.to_dict(), "flwr-version": flwr.__version__}
    if ckpt is not None:
        config_json["resumed-after-round"] = ckpt.server_round
    writer = RunWriter(run_dir, config_json, cfg.tensorboard_dir(run_dir))
    switches = resolve_switches(cfg.strategy, cfg.clustering, cfg.ranks, cfg.aggregation)
    clients = describe_clients(grid, cfg)
    log(
        INFO,
        "%d clients: %s; results in %s",
        len(clients),
        ", ".join(f"{c.client_id}:{c.task}" for c in clients),
        run_dir,
    )
    t_plan = time.perf_counter()
    plan = plan_federation(grid, cfg, clients, switches) if ckpt is None else _plan_from_checkpoint(ckpt, clients)
    strategy = PersonalizedPipeline(
        cfg.strategy,
        switches,
        plan.members,
        plan.initial,
        cfg.lora_alpha,
        plan.adjacency,
        cfg.laplacian_eta,
        server_lr=cfg.server_lr,
        factor_split=cfg.factor_split,
        frozen=plan.frozen,
        dropped=plan.dropped,
        prune_gamma=cfg.hetlora_gamma,
    )
    writer.write_json("clusters.json", plan.clusters)
    writer.write_table("ranks", plan.ranks)
    if plan.adjacency is not None:
        writer.write_json(
            "adjacency.json", {"client-ids": [c.client_id for c in clients], "a": plan.adjacency.tolist()}
        )
    log(INFO, "%s", strategy.summary())
    if plan.clusters.get("ari-vs-declared-tasks") is not None and switches.clustering == "learned":
        log(
            INFO,
            "clusters: k=%d groups %s (ARI %.3f against the declared tasks, for evaluation only)",
            plan.clusters["k"],
            plan.clusters["groups"],
            plan.clusters["ari-vs-declared-tasks"],
        )
    for row in plan.ranks:
        log(
            INFO,
            "client %d %s: ranks [%s], predicted peak %.0f MB of %.0f MB",
            row["client-id"],
            row["device"],
            row["ranks-per-layer"],
            row["predicted-peak-bytes"] / 1e6,
            row["memory-budget-bytes"] / 1e6,
        )
    split = None
    if cfg.split != "none":
        if switches.ranks != "uniform":
            raise AtlasError(
                f"split learning sets the cut from the memory budget: use ranks = uniform with split "
                f"(strategy {cfg.strategy} plans ranks = {switches.ranks})"
            )
        split, choices = plan_split(cfg, clients, {c.client_id: strategy.state_for(c.client_id) for c in clients})
        writer.write_table("split", choices)
        for row in choices:
            log(
                INFO,
                "client %d: split at block %d, predicted client peak %.0f MB of %.0f MB",
                row["client-id"],
                row["cut"],
                row["client-predicted-bytes"] / 1e6,
                row["memory-budget-bytes"] / 1e6,
            )
    plan_seconds = time.perf_counter() - t_plan

    evals: dict[int, dict[str, float]] = {}
    last_train: dict[int, dict[str, float]] = {}
    first_round = 1
    if ckpt is not None:
        evals = {int(k): v for k, v in ckpt.meta["evals"].items()}
        last_train = {int(k): v for k, v in ckpt.meta["last-train"].items()}
        writer.rounds = [dict(r) for r in ckpt.meta["rounds"]]
        plan_seconds = float(ckpt.meta["plan-seconds"])
        ckpt.restore_rng()
        first_round = ckpt.server_round + 1
        log(INFO, "resumed from %s after round %d", ckpt.run_dir, ckpt.server_round)
    energy_file = run_dir / "rank-energy.json"
    energy_rows = json.loads(energy_file.read_text()) if ckpt is not None and energy_file.is_file() else []
    limit = cfg.time_limit_minutes * 60.0
    longest_round, stopped_by = 0.0, "num-server-rounds"
    for server_round in range(first_round, cfg.num_server_rounds + 1):
        t0 = time.perf_counter()
        if split is None:
            train_metrics, train_io, extra = _train_federated(grid, cfg, clients, strategy, server_round, last_train)
        else:
            train_metrics, train_io, extra = _train_split(grid, cfg, split, strategy, server_round, last_train)
        t1 = time.perf_counter()
        shared = evaluation_groups(clients, strategy)
        ok_eval, eval_io = _send(
            grid, list(shared), strategy, "evaluate", server_round, cfg.reply_timeout_seconds or None, cfg.precision
        )
        for representative, msg in ok_eval:
            metrics = {k: v for k, v in msg.content.metric_records["metrics"].items() if k != "client-id"}
            for member in shared[representative]:
                evals[member.client_id] = {**metrics, "evaluated-by": float(representative.client_id)}
        t3 = time.perf_counter()
        row: dict[str, Any] = {
            "round": server_round,
            **train_metrics,
            **_task_means(evals, clients),
            **{k: train_io[k] + eval_io.get(k, 0.0) for k in train_io},
            **extra,
            "train-seconds": t1 - t0 - extra["aggregate-seconds"],
            "eval-seconds": t3 - t1,
            "round-seconds": t3 - t0,
        }
        writer.add_round(row)
        energy_rows = [r for r in energy_rows if r["round"] < server_round] + rank_energy(
            strategy, server_round, cfg.lora_alpha
        )
        writer.write_table("rank-energy", energy_rows)
        meta = _checkpoint_meta(cfg, plan, evals, last_train, writer, plan_seconds)
        save_checkpoint(run_dir, server_round, strategy.adapters, strategy.heads, meta)
        log(INFO, "%s", _round_line(server_round, cfg.num_server_rounds, row, cfg.tasks))
        longest_round = max(longest_round, t3 - t0)
        # Between rounds: stop when the next round, if as long as the longest so far, would end past the limit.
        if limit and server_round < cfg.num_server_rounds and time.perf_counter() - started + longest_round > limit:
            stopped_by = "time-limit"
            log(
                WARNING,
                "time limit %.1f min: stopped after round %d; continue with resume-from = %s",
                cfg.time_limit_minutes,
                server_round,
                run_dir,
            )
            break

    client_rows = [
        {
            "client-id": c.client_id,
            "task": c.task,
            "num-train": c.num_train,
            "num-eval": c.num_eval,
            **{k: v for k, v in evals.get(c.client_id, {}).items() if k != "client-id"},
            "train-loss": last_train.get(c.client_id, {}).get("train-loss", float("nan")),
            "train-seconds": last_train.get(c.client_id, {}).get("train-seconds", float("nan")),
        }
        for c in clients
    ]
    writer.write_clients(client_rows)
    final = writer.rounds[-1]
    plan_kinds = {str(r.get("plan", switches.ranks)) for r in plan.ranks}
    dp = dp_summary(cfg, switches.needs_fingerprints, int(final["round"]))
    over_budget = any(not r.get("fits-budget", True) for r in plan.ranks)
    writer.write_summary(
        {
            "strategy": strategy.summary(),
            "switches": {
                "clustering": switches.clustering,
                "ranks": switches.ranks,
                "aggregation": switches.aggregation,
                "laplacian-eta": strategy.eta,
                "server-lr": strategy.server_lr,
                "factor-split": strategy.factor_split,
                "frozen-layers": cfg.frozen_layers if plan_kinds & {"budget", "shrink"} else "use",
                "over-budget": cfg.over_budget if plan_kinds & {"shrink", "drop"} or over_budget else "shrink",
                "rank-tiers": cfg.rank_tiers,
            },
            "dp": dp,
            "clusters-k": plan.clusters["k"],
            "clusters-ari": plan.clusters.get("ari-vs-declared-tasks"),
            "plan-seconds": plan_seconds,
            "rounds": final["round"],
            "rounds-planned": cfg.num_server_rounds,
            "stopped-by": stopped_by,
            "resumed-after-round": None if ckpt is None else ckpt.server_round,
            "clients": len(clients),
            "final": {k: v for k, v in final.items() if "-" in k and k.split("-")[0] in cfg.tasks},
            "mean-main-metric": final["mean-main-metric"],
            "bytes-sent-total": sum(r["bytes-sent"] for r in writer.rounds),
            "bytes-received-total": sum(r["bytes-received"] for r in writer.rounds),
            "failures-total": sum(r.get("failures", 0.0) for r in writer.rounds),
            "wall-seconds": time.perf_counter() - started,
        }
    )
    if dp is not None:
        log(
            INFO,
            "DP on updates: clip %g, noise %g: epsilon %s at delta %g over %d rounds (%s with the fingerprint)",
            dp["clip"],
            dp["noise"],
            "unbounded" if dp["epsilon-updates"] is None else f"{dp['epsilon-updates']:.2f}",
            dp["delta"],
            dp["rounds"],
            "unbounded" if dp["epsilon-with-fingerprint"] is None else f"{dp['epsilon-with-fingerprint']:.2f}",
        )
    log(INFO, "run finished: results in %s", run_dir)
    return RunOutcome(run_dir, strategy)
