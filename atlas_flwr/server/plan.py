"""Phase 1 (fingerprints, groups, graph) and phase 2 (ranks under each client's memory budget), before round 1."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from flwr.serverapp import Grid

from atlas_flwr.client.fingerprint import layer_of
from atlas_flwr.client.local import initial_state, modules_per_layer
from atlas_flwr.common.checkpoint import Checkpoint
from atlas_flwr.common.config import Config
from atlas_flwr.common.errors import AtlasError
from atlas_flwr.common.records import to_numpy
from atlas_flwr.common.state import State, module_ranks
from atlas_flwr.server.protocol import collect_fingerprints
from atlas_flwr.server.shapes import model_shape, train_shape
from strategies.clustering import adjusted_rand
from strategies.memory import (
    Calibration,
    ModelShape,
    TrainShape,
    largest_fitting_batch,
    predict_forward_bytes,
    predict_peak_bytes,
)
from strategies.pipeline import ClientInfo, Member, Switches, fingerprint_graph, plan_groups, plan_ranks
from strategies.ranks import allocate_ranks
from strategies.split_cut import plan_split_ranks


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
    """Fingerprints, groups and graph; then each client's ranks, held modules and starting state."""
    shape, step = model_shape(cfg), train_shape(cfg)
    prints = None
    if switches.needs_fingerprints:
        slices = {c.client_id: fingerprint_batch(cfg, c, shape, step) for c in clients}
        prints = collect_fingerprints(grid, clients, {i: batch for i, (batch, _) in slices.items()})
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
    adjacency = fingerprint_graph(prints.vectors, groups, cfg.laplacian_graph) if prints is not None else None

    uniform = tuple(to_numpy(t) for t in initial_state(cfg))
    layers = modules_per_layer(uniform[0])
    initial: dict[int, tuple[State, State]] = {}
    frozen: dict[int, list[str]] = {}
    dropped: list[int] = []
    rank_rows: list[dict[str, Any]] = []
    built: dict[tuple, tuple[State, State]] = {}
    common = _common_ranks(cfg, clients, shape, step) if switches.ranks == "common" else None
    for i, client in enumerate(clients):
        cap, calibration = _rank_cap(cfg, client), Calibration.for_device(client.device)
        row: dict[str, Any] = {
            "client-id": client.client_id,
            "task": client.task,
            "device": client.device_profile,
            "trains-on": client.device,  # split halves too compute on the client's device
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
            # Split learning answers the memory budget with its cut (not the device's rank cap, which still binds),
            # and the centralized reference has no device.
            fits_memory = client.memory_bytes == 0 or uniform_peak["total"] <= client.memory_bytes
            fits = (fits_memory or cfg.split != "none") and cap >= cfg.lora_rank
            exempt = cfg.over_budget == "train" or switches.pooled
            plan_kind = "uniform" if fits or exempt else cfg.over_budget
            if plan_kind == "shrink":  # the budget allocator without fingerprints: every layer weighs the same
                importance = [1.0] * shape.num_layers
        if importance is not None or plan_kind == "common":
            # A split client holds no frozen modules: what its budget cannot train below the cut stays unadapted.
            split_budget = plan_kind in ("budget", "shrink") and cfg.split != "none"
            frozen_rank = cap if cfg.frozen_layers == "use" and plan_kind != "common" and not split_budget else 0
            try:
                if split_budget:
                    cut, ranks, parts = plan_split_ranks(
                        shape, step, client.memory_bytes, importance, cap, _fixed_cut(cfg), calibration
                    )
                    pattern = {m: r for layer, r in zip(layers, ranks, strict=True) if r for m in layer}
                    predicted, binding, row["cut"] = parts["total"], None, cut
                elif plan_kind == "common":
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
            row["fingerprint-batch"], row["predicted-fingerprint-bytes"] = slices[client.client_id]
        row["eval-batch"], row["predicted-eval-bytes"] = eval_batch(
            cfg, client, shape, step, initial[client.client_id][0]
        )
        rank_rows.append(row)
    members = [Member(c.client_id, c.task, g) for c, g in zip(clients, groups, strict=True)]
    return Plan(members, initial, adjacency, clusters, rank_rows, frozen, dropped)


def fingerprint_batch(cfg: Config, client: ClientInfo, shape: ModelShape, step: TrainShape) -> tuple[int, int]:
    """The slice size of a client's fingerprint and its predicted peak: the largest of ``eval-batch-size``,
    its halves, ... 1 at which a forward and backward through every layer's ``lora-rank`` adapter (the
    fingerprint's model; gradients, no optimizer) fits the client's budget."""
    calibration = Calibration.for_device(client.device)
    full = 1 if cfg.fingerprint_kind == "lora-grad" else cfg.eval_batch_size

    def price(batch: int) -> int:
        sliced = replace(step, batch=batch)
        return predict_peak_bytes(shape, sliced, [cfg.lora_rank] * shape.num_layers, "sgd", calibration)["total"]

    batch = largest_fitting_batch(price, client.memory_bytes, full)
    return batch, price(batch)


def eval_batch(cfg: Config, client: ClientInfo, shape: ModelShape, step: TrainShape, adapter: State) -> tuple[int, int]:
    """The slice size of a client's evaluation and its predicted peak: the largest of ``eval-batch-size``,
    its halves, ... 1 at which a forward without gradients through the adapter it holds fits its budget."""
    calibration = Calibration.for_device(client.device)
    ranks: list[dict[str, int]] = [{} for _ in range(shape.num_layers)]
    for module, rank in module_ranks(adapter).items():
        target = next(n for n in shape.target_names if module == n or module.endswith("." + n))
        ranks[layer_of(module)][target] = rank

    def price(batch: int) -> int:
        return predict_forward_bytes(shape, replace(step, batch=batch), ranks, calibration)["total"]

    batch = largest_fitting_batch(price, client.memory_bytes, cfg.eval_batch_size)
    return batch, price(batch)


def _fixed_cut(cfg: Config) -> int | None:
    """The cut ``split`` names, or None for ``auto`` (the plan chooses it)."""
    return None if cfg.split == "auto" else int(cfg.split)


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
        cap, calibration = _rank_cap(cfg, client), Calibration.for_device(client.device)
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


def plan_from_checkpoint(ckpt: Checkpoint, clients: Sequence[ClientInfo]) -> Plan:
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
