"""FedAvg of LoRA adapters and task heads inside groups of clients.

One class serves the baselines, which differ only in how clients are grouped:

========== ================== ==================
strategy   adapter groups     head groups
========== ================== ==================
fedavg     all clients        clients of a task
local-only each client alone  each client alone
========== ================== ==================

Heads are never averaged across tasks: a head group never spans two tasks.
The server keeps every group's state between rounds; a client keeps nothing.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import numpy as np

from strategies.aggregation import State, weighted_average

GROUPINGS = ("all", "task", "client")


@dataclass(frozen=True)
class ClientInfo:
    """A client as the server knows it after the describe query."""

    client_id: int
    node_id: int
    task: str
    num_train: int
    num_eval: int
    eval_digest: str = ""  # equal digests: the same evaluation rows (empty: unknown)


@dataclass
class TrainReply:
    """One client's successful train reply, decoded."""

    client: ClientInfo
    adapter: State
    head: State
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


def group_key(grouping: str, client: ClientInfo) -> Hashable:
    """The group a client belongs to under a grouping rule."""
    if grouping == "all":
        return "all"
    if grouping == "task":
        return client.task
    if grouping == "client":
        return client.client_id
    raise ValueError(f"unknown grouping {grouping!r}: expected one of {', '.join(GROUPINGS)}")


class GroupedAdapterAveraging:
    """Weighted (``num-examples``) averaging of adapters and heads within groups.

    Parameters
    ----------
    name : str
        Strategy name, for logs and results.
    initial_adapter, initial_head : dict[str, ndarray]
        The state every group starts from.
    adapter_grouping, head_grouping : {"all", "task", "client"}
        Which clients share an adapter and which share a head. ``head_grouping`` must not
        be ``"all"``: a head is specific to its task.
    """

    def __init__(
        self,
        name: str,
        initial_adapter: State,
        initial_head: State,
        *,
        adapter_grouping: str,
        head_grouping: str,
    ) -> None:
        if head_grouping == "all":
            raise ValueError("head_grouping 'all' would average heads across tasks: use 'task' or 'client'")
        for grouping in (adapter_grouping, head_grouping):
            group_key(grouping, ClientInfo(0, 0, "", 0, 0))  # validates the name
        self.name = name
        self.adapter_grouping = adapter_grouping
        self.head_grouping = head_grouping
        self._initial = (dict(initial_adapter), dict(initial_head))
        self.adapters: dict[Hashable, State] = {}
        self.heads: dict[Hashable, State] = {}

    def state_for(self, client: ClientInfo) -> tuple[State, State]:
        """The adapter and head the client trains from (or is evaluated with)."""
        adapter = self.adapters.get(group_key(self.adapter_grouping, client), self._initial[0])
        head = self.heads.get(group_key(self.head_grouping, client), self._initial[1])
        return adapter, head

    def aggregate_train(self, replies: Sequence[TrainReply]) -> dict[str, float]:
        """Average the replies within each group; groups without replies keep their state.

        Replies are sorted by client id first, so the result does not depend on arrival order.
        """
        ordered = sorted(replies, key=lambda r: r.client.client_id)
        for grouping, store, attr in (
            (self.adapter_grouping, self.adapters, "adapter"),
            (self.head_grouping, self.heads, "head"),
        ):
            groups: dict[Hashable, list[TrainReply]] = defaultdict(list)
            for reply in ordered:
                groups[group_key(grouping, reply.client)].append(reply)
            for key, members in groups.items():
                store[key] = weighted_average([getattr(m, attr) for m in members], [m.num_examples for m in members])
        total = sum(r.num_examples for r in ordered)
        losses = [r.metrics.get("train-loss", np.nan) * r.num_examples for r in ordered]
        return {"train-loss": float(np.sum(losses) / total) if total else float("nan"), "num-examples": float(total)}

    def summary(self) -> str:
        """One line describing the strategy."""
        return (
            f"{self.name}: adapters averaged over '{self.adapter_grouping}' groups, "
            f"heads over '{self.head_grouping}' groups, weighted by num-examples"
        )


def make_strategy(name: str, initial_adapter: State, initial_head: State) -> GroupedAdapterAveraging:
    """The strategy preset for a ``strategy`` run-config value."""
    presets = {"fedavg": ("all", "task"), "local-only": ("client", "client")}
    if name not in presets:
        raise ValueError(f"unknown strategy {name!r}: expected one of {', '.join(presets)}")
    adapter_grouping, head_grouping = presets[name]
    return GroupedAdapterAveraging(
        name, initial_adapter, initial_head, adapter_grouping=adapter_grouping, head_grouping=head_grouping
    )
