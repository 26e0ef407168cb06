"""What a run reports: the progress line, per-round tables, the checkpoint's metadata, the DP account."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import numpy as np

from atlas_flwr.common.config import Config
from atlas_flwr.common.dp import run_epsilon
from atlas_flwr.common.results import RunWriter
from atlas_flwr.common.state import module_ranks
from atlas_flwr.data import task_spec
from atlas_flwr.server.plan import Plan
from strategies.aggregation import energy_by_slice
from strategies.pipeline import ClientInfo, PersonalizedPipeline


def task_means(evals: dict[int, dict[str, float]], clients: Sequence[ClientInfo]) -> dict[str, float]:
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


def round_line(server_round: int, total: int, row: dict[str, Any], tasks: Sequence[str]) -> str:
    parts = [f"round {server_round}/{total}", f"train loss {row['train-loss']:.4f}"]
    for t in tasks:
        metric = task_spec(t).main_metric
        if f"{t}-{metric}" in row:
            parts.append(f"{t} {metric} {row[f'{t}-{metric}']:.3f}")
    if "update-cosine" in row:  # client drift inside the groups (strategies/drift.py)
        parts.append(f"update cosine {row['update-cosine']:.2f}")
    parts.append(f"down {row['bytes-sent'] / 1e6:.2f} MB up {row['bytes-received'] / 1e6:.2f} MB")
    parts.append(f"{row['round-seconds']:.1f} s")
    return " | ".join(parts)


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


def checkpoint_meta(
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


def client_rows(
    clients: Sequence[ClientInfo], evals: dict[int, dict[str, float]], last_train: dict[int, dict[str, float]]
) -> list[dict[str, Any]]:
    """One row per client: its rows, its last evaluation and its last training step (NaN if it never trained)."""
    return [
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


def run_summary(
    cfg: Config,
    plan: Plan,
    pipeline: PersonalizedPipeline,
    rounds: Sequence[dict[str, Any]],
    *,
    plan_seconds: float,
    stopped_by: str,
    resumed_after: int | None,
    wall_seconds: float,
) -> dict[str, Any]:
    """``summary.json``: the switches as run, the final metrics, the totals, and why the run stopped."""
    switches = pipeline.switches
    final = rounds[-1]
    plan_kinds = {str(r.get("plan", switches.ranks)) for r in plan.ranks}
    over_budget = any(not r.get("fits-budget", True) for r in plan.ranks)
    return {
        "strategy": pipeline.summary(),
        "switches": {
            "clustering": switches.clustering,
            "ranks": switches.ranks,
            "aggregation": switches.aggregation,
            "laplacian-eta": pipeline.eta,
            "laplacian-graph": cfg.laplacian_graph,
            "laplacian-input": pipeline.laplacian_input,
            "server-lr": pipeline.server_lr,
            "factor-split": pipeline.factor_split,
            "server-lr-rule": pipeline.server_lr_rule,
            "frozen-layers": cfg.frozen_layers if plan_kinds & {"budget", "shrink"} else "use",
            "over-budget": cfg.over_budget if plan_kinds & {"shrink", "drop"} or over_budget else "shrink",
            "rank-tiers": cfg.rank_tiers,
        },
        "dp": dp_summary(cfg, switches.needs_fingerprints, int(final["round"])),
        "clusters-k": plan.clusters["k"],
        "clusters-ari": plan.clusters.get("ari-vs-declared-tasks"),
        "plan-seconds": plan_seconds,
        "rounds": final["round"],
        "rounds-planned": cfg.num_server_rounds,
        "stopped-by": stopped_by,
        "resumed-after-round": resumed_after,
        "clients": len(pipeline.members),
        "final": {k: v for k, v in final.items() if "-" in k and k.split("-")[0] in cfg.tasks},
        "mean-main-metric": final["mean-main-metric"],
        "bytes-sent-total": sum(r["bytes-sent"] for r in rounds),
        "bytes-received-total": sum(r["bytes-received"] for r in rounds),
        "failures-total": sum(r.get("failures", 0.0) for r in rounds),
        "wall-seconds": wall_seconds,
    }
