"""What each client's process measured for each message (``measure-memory = true``), set against its budget.

Clients attach a ``memory`` MetricRecord to every reply (:func:`atlas_flwr.client.mods.measure_memory`);
the server keeps one row per reply and, at the end, one row per client: the largest working memory of each
kind of message (describe, fingerprint, train, split steps, evaluate), the plan's prediction and the budget.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from flwr.app import Message

from strategies.pipeline import ClientInfo

#: Message types as the tables name them.
PHASES = {
    "query.describe": "describe",
    "query.fingerprint": "fingerprint",
    "train": "train",
    "train.split": "split",
    "evaluate": "evaluate",
}


class MemoryLog:
    """The ``memory`` records of every reply the server pulls, in arrival order."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def record(self, reply: Message) -> None:
        """Keep a reply's ``memory`` record (replies without one, errors included, are skipped)."""
        if reply.has_error() or "memory" not in reply.content.metric_records:
            return
        memory = reply.content.metric_records["memory"]
        self.records.append(
            {
                "node-id": reply.metadata.src_node_id,
                "phase": PHASES.get(reply.metadata.message_type, reply.metadata.message_type),
                "round": reply.metadata.group_id,
                "working-bytes": int(memory.get("working-bytes", 0)),
                "file-bytes": int(memory.get("file-bytes", 0)),
                "rss-bytes": int(memory.get("rss-bytes", 0)),
            }
        )

    def rows(self, clients: Sequence[ClientInfo]) -> list[dict[str, Any]]:
        """One row per reply: client, phase, round, working and resident bytes."""
        by_node = {c.node_id: c.client_id for c in clients}
        return [
            {"client-id": by_node.get(r["node-id"], -1), **{k: v for k, v in r.items() if k != "node-id"}}
            for r in self.records
        ]

    def per_client(self, clients: Sequence[ClientInfo], predicted: Mapping[int, int]) -> list[dict[str, Any]]:
        """Per client: the largest working memory per phase and overall, its prediction and budget, and whether
        every message stayed within the budget (empty where the client has no budget).

        A message's memory against the budget is its working bytes less the model file's pages it mapped in
        (``file-bytes``: the read-only backbone cache, which the kernel can drop); the largest of those is
        ``max-allocated-bytes``, and ``max-file-bytes`` the largest such mapping.
        """
        rows = self.rows(clients)
        out = []
        for c in clients:
            mine = [r for r in rows if r["client-id"] == c.client_id]
            peaks = {
                f"{phase}-bytes": max((r["working-bytes"] for r in mine if r["phase"] == phase), default=0)
                for phase in PHASES.values()
            }
            peak = max(peaks.values(), default=0)
            allocated = max((r["working-bytes"] - r["file-bytes"] for r in mine), default=0)
            out.append(
                {
                    "client-id": c.client_id,
                    "task": c.task,
                    "device": c.device_profile,
                    "budget-bytes": c.memory_bytes,
                    "predicted-train-bytes": predicted.get(c.client_id, 0),
                    **peaks,
                    "max-working-bytes": peak,
                    "max-file-bytes": max((r["file-bytes"] for r in mine), default=0),
                    "max-allocated-bytes": allocated,
                    "within-budget": "" if not c.memory_bytes else allocated <= c.memory_bytes,
                    "messages": len(mine),
                }
            )
        return out
