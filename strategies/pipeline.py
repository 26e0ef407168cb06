"""One round pipeline for every language-model method; the methods are presets of its switches.

=================== ============ ========= ============ =========
strategy            clustering   ranks     aggregation  Laplacian
=================== ============ ========= ============ =========
centralized         oracle       uniform   none, pooled off
local-only          none         uniform   none         off
fedavg              none         uniform   factor-avg   off
fedavg-cluster      learned      uniform   factor-avg   off
homlora             none         common    factor-avg   off
hetlora             none         uniform   zero-pad     off, + norm weights and rank self-pruning
flexlora            none         uniform   svd-dense    off
atlas-no-laplacian  learned      budget    exact        off
atlas               learned      budget    exact        on
=================== ============ ========= ============ =========

Ranks: ``uniform`` plans ``lora-rank`` on every layer; a client whose device cannot hold that plan (memory,
or its rank cap) follows ``over-budget``: ``shrink`` to the largest plan that fits (the budget allocator
with equal layer importance), ``drop`` out of training (it still takes its group's model), or ``train``
anyway (v1; infeasible on the device). ``budget`` plans each client's ranks under its memory and rank cap,
weighting layers by fingerprint importance. ``common`` gives every client the same plan: per layer the
smallest of the clients' ``shrink`` plans, which every client fits (homogeneous LoRA). ``factor-avg``
over unequal ranks zero-pads (FedAvg's only reading of it), which is what HetLoRA's aggregation does too.

``centralized`` is the reference, not a federated method: each task's first client holds the union of
the task's rows (the ClientApp pools them) and is the only one that trains; the task's other clients
take its model.

Any switch can be set on its own (run config ``clustering``, ``ranks``, ``aggregation``,
``laplacian-eta``), so an ablation changes one thing and runs the same code.

A round, on the server:

1. every client trains from *its* adapter and head (the server keeps one per client);
2. adapters are aggregated inside each group (all clients, a learned cluster, or a task) with the
   chosen method, and every member gets the result at its own ranks; ``none`` keeps each client's own;
3. with the Laplacian on, every client's adapter moves towards its neighbours' on the fingerprint
   similarity graph, in dW space, across groups too (so it is not a no-op after step 2);
4. heads are averaged per head group: the client alone (``aggregation = none``), its task (no
   clustering) or its group. A head is never averaged across groups.

Adapters of different clients may hold different modules (a small-memory client adapts only its top
layers). A module is aggregated over the clients that hold it; a client that does not hold it is not
counted as a zero update, because it did not train it.

Pure numpy: no Flower import; states are ``dict[str, ndarray]``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from atlas_flwr.common.state import LORA_A_SUFFIX, LORA_B_SUFFIX, State, module_ranks
from strategies.aggregation import (
    aggregate_states,
    lora_scaling,
    refactor_state,
    server_step,
    weighted_average,
)
from strategies.clustering import ClusterResult, canonical_labels, cluster_fingerprints
from strategies.drift import SERVER_LR_RULES, cosines, drift, keep_length_factor, update_gram, vector_gram
from strategies.laplacian import laplacian_states, similarity_graph
from strategies.memory import Calibration, ModelShape, TrainShape
from strategies.ranks import RankAllocation, allocate_ranks

CLUSTERINGS = ("none", "learned", "oracle")
RANK_MODES = ("uniform", "budget", "common")
AGGREGATIONS = ("exact", "zero-pad", "svd-dense", "factor-avg", "none")
#: The Laplacian graph's kernel bandwidth: the median distance of all pairs, or of the pairs inside a group.
LAPLACIAN_GRAPHS = ("median", "cluster")
#: What the Laplacian mixes under dW-space aggregation: the groups' untruncated means (truncated once,
#: after the step), or what each client holds after aggregation truncated the mean to its rank.
LAPLACIAN_INPUTS = ("aggregate", "held")


@dataclass(frozen=True)
class Switches:
    """The phases a method runs."""

    clustering: str
    ranks: str
    aggregation: str
    laplacian: bool
    pooled: bool = False  # one model per task, trained by the task's first client on all its rows
    hetlora: bool = False  # HetLoRA's extras: weights by ||dW|| and rank self-pruning (with the client penalty)

    def __post_init__(self) -> None:
        for name, allowed in (("clustering", CLUSTERINGS), ("ranks", RANK_MODES), ("aggregation", AGGREGATIONS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"unknown {name} {getattr(self, name)!r}: expected one of {', '.join(allowed)}")

    @property
    def needs_fingerprints(self) -> bool:
        """Learned clusters, budget ranks (layer importance) and the Laplacian graph all need fingerprints."""
        return self.clustering == "learned" or self.ranks == "budget" or self.laplacian


PRESETS: dict[str, Switches] = {
    "centralized": Switches("oracle", "uniform", "none", False, pooled=True),
    "local-only": Switches("none", "uniform", "none", False),
    "fedavg": Switches("none", "uniform", "factor-avg", False),
    "fedavg-cluster": Switches("learned", "uniform", "factor-avg", False),
    "homlora": Switches("none", "common", "factor-avg", False),
    "hetlora": Switches("none", "uniform", "zero-pad", False, hetlora=True),
    "flexlora": Switches("none", "uniform", "svd-dense", False),
    "atlas-no-laplacian": Switches("learned", "budget", "exact", False),
    "atlas": Switches("learned", "budget", "exact", True),
    # atlas with the model cut between client and server (its config sets split = auto unless told a block).
    "atlas-split": Switches("learned", "budget", "exact", True),
}


def resolve_switches(
    strategy: str, clustering: str = "preset", ranks: str = "preset", aggregation: str = "preset"
) -> Switches:
    """The preset of ``strategy`` with every switch not equal to ``"preset"`` overriding it."""
    if strategy not in PRESETS:
        raise ValueError(f"unknown strategy {strategy!r}: expected one of {', '.join(PRESETS)}")
    base = PRESETS[strategy]
    return Switches(
        base.clustering if clustering == "preset" else clustering,
        base.ranks if ranks == "preset" else ranks,
        base.aggregation if aggregation == "preset" else aggregation,
        base.laplacian,
        base.pooled,
        base.hetlora,
    )


@dataclass(frozen=True)
class ClientInfo:
    """A client as the server knows it after the describe query."""

    client_id: int
    node_id: int
    task: str
    num_train: int
    num_eval: int
    eval_digest: str = ""  # equal digests: the same evaluation rows (empty: unknown)
    device_profile: str = ""
    memory_bytes: int = 0
    max_rank: int = 0  # the device's rank cap (0: none)
    device: str = "cpu"  # where it trains: the memory model's constants differ (CPU dropout masks are fp32)


@dataclass(frozen=True)
class Member:
    """A client as the pipeline sees it: id, declared task (for heads of unclustered runs), group."""

    client_id: int
    task: str
    group: int


@dataclass
class Update:
    """One client's decoded train reply."""

    client_id: int
    adapter: State
    head: State
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


def _split_by_holders(states: Sequence[State]) -> dict[tuple[int, ...], list[str]]:
    """Group module names by the tuple of state indices that hold them."""
    holders: dict[str, list[int]] = defaultdict(list)
    for i, state in enumerate(states):
        for module in module_ranks(state):
            holders[module].append(i)
    by_set: dict[tuple[int, ...], list[str]] = defaultdict(list)
    for module, idx in sorted(holders.items()):
        by_set[tuple(idx)].append(module)
    return by_set


def _subset(state: State, modules: Sequence[str]) -> State:
    keep = set(modules)
    return {k: v for k, v in state.items() if k.rsplit(".lora_", 1)[0] in keep}


#: Aggregations that work on dW = s B A (the rest average the factors themselves).
DW_AGGREGATIONS = ("exact", "svd-dense")


def aggregate_group(
    states: Sequence[State],
    weights: Sequence[float],
    alpha: float,
    method: str,
    held: Sequence[Mapping[str, int]] | None = None,
) -> list[State]:
    """Aggregate a group's adapters module by module over the clients that trained each module.

    ``held`` (module -> rank, one per client) lists what each client holds, at which rank; by default
    what its state holds. A client holding a module it did not train (``frozen-layers = use``) gets the
    aggregate of those that trained it, at its own rank; a module that no client trained is left out of
    the outputs (the caller keeps what the client had). See
    :func:`strategies.aggregation.aggregate_states` for the methods.
    """
    held = list(held) if held is not None else [module_ranks(s) for s in states]
    trained = [module_ranks(s) for s in states]
    by_clients: dict[tuple[tuple[int, ...], tuple[int, ...]], list[str]] = defaultdict(list)
    for module in sorted(set().union(*trained)):
        trainers = tuple(i for i, t in enumerate(trained) if module in t)
        frozen = tuple(i for i, h in enumerate(held) if module in h and i not in trainers)
        by_clients[(trainers, frozen)].append(module)
    outputs: list[State] = [{} for _ in states]
    for (trainers, frozen), modules in by_clients.items():
        subs = [_subset(states[i], modules) for i in trainers]
        targets = [{m: held[i][m] for m in modules} for i in (*trainers, *frozen)]
        ranks = {r for sub in subs for r in module_ranks(sub).values()}
        ranks |= {r for t in targets for r in t.values()}
        # FedAvg over unequal ranks can only zero-pad (HetLoRA's rule); with equal ranks the two are one.
        used = "zero-pad" if method == "factor-avg" and len(ranks) > 1 else method
        merged = aggregate_states(subs, [weights[i] for i in trainers], targets, alpha, used)
        for i, state in zip((*trainers, *frozen), merged, strict=True):
            outputs[i].update(state)
    return outputs


def untruncated(held: Sequence[Mapping[str, int]], states: Sequence[State]) -> list[dict[str, int]]:
    """Per holder, every module it holds at a rank no group mean of ``held`` exceeds: the sum of the ranks.

    Exact aggregation at these ranks truncates nothing, so the Laplacian can mix the group means
    themselves and truncate once, to each client's own rank.
    """
    total: dict[str, int] = defaultdict(int)
    for h in held:
        for module, rank in h.items():
            total[module] += rank
    cap: dict[str, int] = {}
    for state in states:
        for module in module_ranks(state):
            cap[module] = min(state[module + LORA_B_SUFFIX].shape[0], state[module + LORA_A_SUFFIX].shape[1])
    return [{m: min(total[m], cap.get(m, total[m])) for m in h} for h in held]


def delta_norm(state: State, alpha: float) -> float:
    """``sum over modules of ||s B A||_F``: HetLoRA's sparsity weight of a client's update."""
    total = 0.0
    for module, rank in module_ranks(state).items():
        b = np.asarray(state[module + LORA_B_SUFFIX], dtype=np.float64)
        a = np.asarray(state[module + LORA_A_SUFFIX], dtype=np.float64)
        total += lora_scaling(alpha, rank) * float(np.linalg.norm(b @ a))
    return total


def _tail(state: State, module: str, keep: int) -> float:
    a, b = state[module + LORA_A_SUFFIX], state[module + LORA_B_SUFFIX]
    return float(np.linalg.norm(a[keep:]) * np.linalg.norm(b[:, keep:]))


def self_prune(sent: State, trained: State, gamma: float) -> dict[str, int]:
    """HetLoRA's rank self-pruning: the modules whose rank drops this round, and their new rank.

    A module of rank r keeps ``k = max(1, floor(gamma r))`` components when its tail,
    ``||A[k:]|| * ||B[:, k:]||`` (the term the client's penalty shrinks), is smaller after local training
    than in the adapter the client received: the penalty won, so the tail is not worth its rank.
    """
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"gamma {gamma!r} is invalid: expected a number in (0, 1]")
    pruned = {}
    before = module_ranks(sent)
    for module, rank in module_ranks(trained).items():
        keep = max(1, int(gamma * rank))
        if keep < rank and before.get(module) == rank and _tail(trained, module, keep) < _tail(sent, module, keep):
            pruned[module] = keep
    return pruned


def truncate_ranks(state: State, ranks: Mapping[str, int], alpha: float) -> State:
    """``state`` with the named modules cut to their first ``ranks[m]`` components, dW of those unchanged.

    PEFT scales by alpha / r, so B is rescaled by ``s_old / s_new`` to keep ``s B[:, :k] A[:k]``.
    """
    out = dict(state)
    for module, keep in ranks.items():
        a, b = state[module + LORA_A_SUFFIX], state[module + LORA_B_SUFFIX]
        rank = a.shape[0]
        if not 1 <= keep <= rank:
            raise ValueError(f"module {module!r}: rank {keep} is invalid: expected 1..{rank}")
        factor = lora_scaling(alpha, rank) / lora_scaling(alpha, keep)
        out[module + LORA_A_SUFFIX] = np.ascontiguousarray(a[:keep])
        out[module + LORA_B_SUFFIX] = (np.asarray(b[:, :keep], dtype=np.float64) * factor).astype(b.dtype)
    return out


def laplacian_all(
    states: Sequence[State],
    adjacency: np.ndarray,
    eta: float,
    alpha: float,
    ranks: Sequence[Mapping[str, int]] | None = None,
) -> list[State]:
    """One Laplacian step over every client, module by module over the clients holding each module.

    ``eta`` in [0, 1] is the fraction of the largest admissible step: ``eta * lam = eta / max_k delta_k``
    on the full graph, so ``eta * lam * delta_k <= 1`` for every client and every sub-graph. ``ranks``
    (module -> rank, one per client) are the output ranks; by default each state's own.
    """
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"laplacian eta {eta!r} is invalid: expected a fraction in [0, 1]")
    a = np.array(adjacency, dtype=np.float64)
    np.fill_diagonal(a, 0.0)
    max_degree = float(a.sum(axis=1).max()) if a.size else 0.0
    step = eta / max_degree if max_degree > 0 else 0.0
    outputs: list[State] = [{} for _ in states]
    for holders, modules in _split_by_holders(states).items():
        subs = [_subset(states[i], modules) for i in holders]
        sub_adjacency = a[np.ix_(holders, holders)]
        targets = [ranks[i] for i in holders] if ranks is not None else None
        mixed = laplacian_states(subs, sub_adjacency, step, 1.0, alpha, target_ranks=targets)
        for i, state in zip(holders, mixed, strict=True):
            outputs[i].update(state)
    return outputs


def plan_groups(
    clustering: str, tasks: Sequence[str], fingerprints: np.ndarray | None, k_max: int, seed: int
) -> tuple[list[int], ClusterResult | None]:
    """Each client's group: one group (``none``), its declared task (``oracle``) or a learned cluster.

    ``learned`` reads only the fingerprints; the tasks are never shown to it.
    """
    if clustering == "none":
        return [0] * len(tasks), None
    if clustering == "oracle":
        return canonical_labels([sorted(set(tasks)).index(t) for t in tasks]), None
    if clustering != "learned":
        raise ValueError(f"unknown clustering {clustering!r}: expected one of {', '.join(CLUSTERINGS)}")
    if fingerprints is None:
        raise ValueError("learned clustering needs fingerprints")
    result = cluster_fingerprints(fingerprints, k_max=k_max, seed=seed)
    return list(result.labels), result


def fingerprint_graph(
    fingerprints: np.ndarray, groups: Sequence[int] | None = None, scale: str = "median"
) -> np.ndarray:
    """The similarity graph on L2-normalised fingerprints (the geometry the clustering uses).

    ``scale = "median"`` sets the kernel bandwidth to the median squared distance of all pairs: with
    several distinct tasks most pairs cross tasks, so a typical cross-task pair weighs about exp(-1).
    ``"cluster"`` sets it to the median over the pairs inside one of ``groups``: clients as close as
    a group's own members weigh about exp(-1), and well-separated groups barely pull on each other.
    With no pair inside a group it falls back to ``"median"``.
    """
    if scale not in LAPLACIAN_GRAPHS:
        raise ValueError(f"unknown laplacian graph {scale!r}: expected one of {', '.join(LAPLACIAN_GRAPHS)}")
    f = np.asarray(fingerprints, dtype=np.float64)
    f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    sigma2 = None
    if scale == "cluster":
        if groups is None or len(groups) != len(f):
            raise ValueError(f"laplacian graph 'cluster' needs one group per client: got {groups!r}")
        inside = [
            float(np.sum((f[k] - f[j]) ** 2))
            for k in range(len(f))
            for j in range(k + 1, len(f))
            if groups[k] == groups[j]
        ]
        median = float(np.median(inside)) if inside else 0.0
        sigma2 = median if median > 0 else None
    return similarity_graph(f, sigma2)


def plan_ranks(
    model: ModelShape,
    train: TrainShape,
    budget_bytes: int,
    importance: Sequence[float],
    modules_per_layer: Sequence[Sequence[str]],
    max_rank: int,
    calibration: Calibration | None = None,
    frozen_rank: int = 0,
) -> tuple[RankAllocation, dict[str, int]]:
    """Per-layer ranks under a client's memory budget, and the module -> rank map of what it trains.

    With ``frozen_rank`` > 0 the budget also holds a frozen adapter of that rank on every other layer.
    Raises ValueError (one line) when the budget cannot hold even one adapted layer.
    """
    allocation = allocate_ranks(
        model, train, budget_bytes, importance, max_rank=max_rank, calibration=calibration, frozen_rank=frozen_rank
    )
    if not any(allocation.ranks):
        raise ValueError(
            f"memory budget {budget_bytes / 1e6:.0f} MB fits no LoRA layer "
            f"(one adapted top layer needs more): raise device-scale or the client's memory"
        )
    pattern = {m: r for layer, r in zip(modules_per_layer, allocation.ranks, strict=True) if r for m in layer}
    return allocation, pattern


class PersonalizedPipeline:
    """Per-client adapters and heads, aggregated by the switches.

    Parameters
    ----------
    name : str
        Strategy name, for logs and results.
    switches : Switches
        The phases to run.
    members : sequence of Member
        Every client with its group (all 0 without clustering).
    initial : mapping client id -> (adapter, head)
        Each client's starting state (its own ranks).
    alpha : float
        ``lora_alpha`` shared by every client.
    adjacency : ndarray, optional
        Client similarities in ``members`` order; required when the Laplacian is on.
    eta : float
        Laplacian step as a fraction of the largest admissible one (ignored when the switch is off).
    server_lr : float
        FedOpt's server learning rate on each group's mean update (1 = plain averaging); used only when
        adapters are aggregated. It moves the heads alike.
    factor_split : str
        How re-factored adapters (dW-space aggregation, the Laplacian) are split into B and A
        (:data:`strategies.aggregation.FACTOR_SPLITS`).
    server_lr_rule : str
        :data:`strategies.drift.SERVER_LR_RULES`. ``keep-length`` multiplies ``server_lr`` per group (and per
        head group) by :func:`strategies.drift.keep_length_factor` of that round's updates.
    frozen : mapping client id -> set of module names, optional
        Modules a client holds and uses but does not train (its budget does not cover them): its
        updates leave them out, and aggregation gives it its group's result for them.
    dropped : iterable of int
        Clients that never train (``over-budget = drop``): each round they take their group's aggregate.
    prune_gamma : float
        HetLoRA's self-pruning keeps this fraction of a module's rank (used when ``switches.hetlora``).
    laplacian_input : str
        :data:`LAPLACIAN_INPUTS`. Under ``held`` two clients of one group at ranks 2 and 16 hold different
        truncations of the same mean, so an edge between them pulls the rank-16 client's tail toward
        zero; ``aggregate`` mixes the means, so in-group edges move nothing.
    """

    def __init__(
        self,
        name: str,
        switches: Switches,
        members: Sequence[Member],
        initial: Mapping[int, tuple[State, State]],
        alpha: float,
        adjacency: np.ndarray | None = None,
        eta: float = 0.0,
        server_lr: float = 1.0,
        factor_split: str = "balanced",
        frozen: Mapping[int, Iterable[str]] | None = None,
        dropped: Iterable[int] = (),
        prune_gamma: float = 0.9,
        laplacian_input: str = "aggregate",
        server_lr_rule: str = "fixed",
    ) -> None:
        if switches.laplacian and adjacency is None:
            raise ValueError("the Laplacian switch is on but no adjacency was given")
        if laplacian_input not in LAPLACIAN_INPUTS:
            raise ValueError(
                f"unknown laplacian input {laplacian_input!r}: expected one of {', '.join(LAPLACIAN_INPUTS)}"
            )
        if server_lr_rule not in SERVER_LR_RULES:
            raise ValueError(f"unknown server lr rule {server_lr_rule!r}: expected one of {', '.join(SERVER_LR_RULES)}")
        missing = sorted({m.client_id for m in members} - set(initial))
        if missing:
            raise ValueError(f"no initial state for clients {missing}")
        self.name = name
        self.switches = switches
        self.members = sorted(members, key=lambda m: m.client_id)
        self.alpha = alpha
        self.adjacency = adjacency
        self.eta = eta if switches.laplacian else 0.0
        self.server_lr = server_lr if switches.aggregation != "none" else 1.0
        self.factor_split = factor_split
        self.server_lr_rule = server_lr_rule if switches.aggregation != "none" else "fixed"
        self.frozen = {m.client_id: frozenset((frozen or {}).get(m.client_id, ())) for m in self.members}
        self.dropped = frozenset(dropped)
        self.prune_gamma = prune_gamma
        self.laplacian_input = laplacian_input
        self.pruned: dict[int, int] = defaultdict(int)  # per client, rank components pruned so far (HetLoRA)
        self.adapters = {m.client_id: dict(initial[m.client_id][0]) for m in self.members}
        self.heads = {m.client_id: dict(initial[m.client_id][1]) for m in self.members}

    def state_for(self, client_id: int) -> tuple[State, State]:
        """The adapter and head a client trains from (or is evaluated with)."""
        return self.adapters[client_id], self.heads[client_id]

    def trained_part(self, client_id: int, adapter: State) -> State:
        """The part of ``adapter`` that the client trains (and sends back): all but its frozen modules."""
        return _subset(adapter, set(module_ranks(adapter)) - self.frozen[client_id])

    def sample(self, fraction: float, minimum: int, seed: int) -> list[int]:
        """This round's trainers: ``max(minimum, int(fraction n))`` of the ``n`` :meth:`trainers`, drawn by ``seed``.

        As Flower's strategies size their sample (``fraction_train``, ``min_train_nodes``); all of them at 1.0.
        """
        pool = self.trainers()
        size = min(len(pool), max(minimum, int(fraction * len(pool))))
        if size >= len(pool):
            return pool
        return sorted(int(i) for i in np.random.default_rng(seed).choice(pool, size=size, replace=False))

    def trainers(self) -> list[int]:
        """The clients that train each round: all but the dropped, or under ``pooled`` each task's first."""
        if not self.switches.pooled:
            return [m.client_id for m in self.members if m.client_id not in self.dropped]
        first: dict[str, int] = {}
        for m in self.members:
            first.setdefault(m.task, m.client_id)
        return sorted(first.values())

    def head_key(self, client_id: int) -> Hashable:
        """The head group of a client: clients with equal keys share a head."""
        return self._head_key(next(m for m in self.members if m.client_id == client_id))

    def aggregation_groups(self) -> dict[int, list[int]]:
        """Client ids per adapter-aggregation group."""
        groups: dict[int, list[int]] = defaultdict(list)
        for m in self.members:
            groups[m.group].append(m.client_id)
        return dict(groups)

    def set_state(self, client_id: int, adapter: State, head: State) -> None:
        """Replace a client's state (split learning computes it outside :meth:`aggregate_train`)."""
        if client_id not in self.adapters:
            raise ValueError(f"unknown client {client_id}")
        self.adapters[client_id], self.heads[client_id] = adapter, head

    def _head_key(self, member: Member) -> Hashable:
        # The head's shape is part of the key: tasks with different label counts never share a head.
        shape = tuple(self.heads[member.client_id]["weight"].shape)
        if self.switches.aggregation == "none":
            return ("client", member.client_id, shape)
        if self.switches.clustering == "none":
            return ("task", member.task, shape)
        return ("group", member.group, shape)

    def aggregate_train(self, updates: Sequence[Update], sat_out: Iterable[int] = ()) -> dict[str, float]:
        """Fold one round's updates into the per-client states; clients without an update keep theirs.

        Clients in ``sat_out`` (not sampled this round) and the dropped ones take their group's aggregate,
        as a frozen holder does; a client whose reply failed keeps its state.
        Updates are sorted by client id first, so the result does not depend on arrival order.
        """
        ordered = sorted(updates, key=lambda u: u.client_id)
        by_id = {m.client_id: m for m in self.members}
        method = self.switches.aggregation
        if self.switches.hetlora:
            ordered = [self._self_prune(u) for u in ordered]
        receivers_only = (self.dropped | frozenset(sat_out)) - {u.client_id for u in ordered}
        dw_space = method in DW_AGGREGATIONS
        truncate_once = dw_space and self.eta > 0 and self.laplacian_input == "aggregate"
        sent = {u.client_id: self.state_for(u.client_id) for u in ordered}
        groups: dict[int, list[Update]] = defaultdict(list)
        for u in ordered:
            groups[by_id[u.client_id].group].append(u)
        grams = self._group_grams(groups, sent)
        lrs = {u.client_id: self.server_lr for u in ordered}
        if self.server_lr_rule == "keep-length":
            for members, gram in grams:
                factor = keep_length_factor(gram, self._weights(members))
                lrs |= {u.client_id: self.server_lr * factor for u in members}
        stepped = {
            u.client_id: server_step(
                self.trained_part(u.client_id, sent[u.client_id][0]),
                u.adapter,
                lrs[u.client_id],
                self.alpha,
                "dw" if dw_space else "factors",
            )
            for u in ordered
        }
        for u in ordered:  # frozen modules stay as sent unless aggregation gives the group's
            self.adapters[u.client_id] = {**sent[u.client_id][0], **u.adapter}
        own_ranks = {i: module_ranks(state) for i, state in self.adapters.items()}
        refactored = set()
        if method != "none":
            for group, members in groups.items():
                # Dropped clients take part as holders that trained nothing: they get the group's result.
                idle = [m.client_id for m in self.members if m.group == group and m.client_id in receivers_only]
                inputs = [stepped[u.client_id] for u in members]
                held = [own_ranks[u.client_id] for u in members] + [own_ranks[i] for i in idle]
                merged = aggregate_group(
                    inputs + [{} for _ in idle],
                    self._weights(members) + [0.0 for _ in idle],
                    self.alpha,
                    method,
                    untruncated(held, inputs) if truncate_once else held,
                )
                receivers = [u.client_id for u in members] + idle
                for client_id, state in zip(receivers, merged, strict=True):
                    self.adapters[client_id] = {**self.adapters[client_id], **state}
                refactored |= set(idle) if dw_space else set()
            if dw_space:
                refactored |= {u.client_id for u in ordered}
        if self.eta > 0:
            ids = [m.client_id for m in self.members]
            ranks = [own_ranks[i] for i in ids] if truncate_once else None
            mixed = laplacian_all([self.adapters[i] for i in ids], self.adjacency, self.eta, self.alpha, ranks)
            self.adapters.update(zip(ids, mixed, strict=True))
            refactored |= set(ids)
        if self.factor_split != "balanced":  # aggregation and the Laplacian split factors evenly
            for i in sorted(refactored):
                self.adapters[i] = refactor_state(self.adapters[i], self.alpha, self.factor_split)
        heads: dict[Hashable, list[Update]] = defaultdict(list)
        for u in ordered:
            heads[self._head_key(by_id[u.client_id])].append(u)
        for key, members in heads.items():
            head_lr = self.server_lr
            if self.server_lr_rule == "keep-length":
                gram = vector_gram([sent[u.client_id][1] for u in members], [u.head for u in members])
                head_lr *= keep_length_factor(gram, [u.num_examples for u in members])
            head = weighted_average(
                [server_step(sent[u.client_id][1], u.head, head_lr, self.alpha, "factors") for u in members],
                [u.num_examples for u in members],
            )
            for m in self.members:  # every client of the head group, with or without an update this round
                if self._head_key(m) == key:
                    self.heads[m.client_id] = head
        if self.switches.pooled:  # the task's other clients take the model its first client trained
            for u in ordered:
                task = by_id[u.client_id].task
                for m in self.members:
                    if m.task == task:
                        self.adapters[m.client_id], self.heads[m.client_id] = u.adapter, self.heads[u.client_id]
        total = sum(u.num_examples for u in ordered)
        loss = sum(u.metrics.get("train-loss", np.nan) * u.num_examples for u in ordered)
        out = {"train-loss": float(loss / total) if total else float("nan"), "num-examples": float(total)}
        if self.server_lr_rule == "keep-length":
            out["server-lr-applied"] = float(np.mean(list(lrs.values()))) if lrs else self.server_lr
        return out | self._drift(grams, by_id)

    def _group_grams(
        self, groups: Mapping[int, list[Update]], sent: Mapping[int, tuple[State, State]]
    ) -> list[tuple[list[Update], np.ndarray]]:
        """Per aggregation group of two or more trainers: its updates and their dW Gram matrix."""
        return [
            (members, update_gram([sent[u.client_id][0] for u in members], [u.adapter for u in members], self.alpha))
            for _, members in sorted(groups.items())
            if len(members) >= 2
        ]

    @staticmethod
    def _drift(grams: Sequence[tuple[list[Update], np.ndarray]], by_id: Mapping[int, Member]) -> dict[str, float]:
        """Client drift: over groups of two or more trainers, the mean of :func:`strategies.drift.drift`, and per
        task the mean cosine of its clients' pairs inside a group (``update-cosine-<task>``)."""
        found, by_task = [], defaultdict(list)
        for members, gram in grams:
            found.append(drift(gram, [float(u.num_examples) for u in members]))
            cos = cosines(gram)
            for i, j in zip(*np.triu_indices(len(members), k=1), strict=True):
                task = by_id[members[i].client_id].task
                if task == by_id[members[j].client_id].task and np.isfinite(cos[i, j]):
                    by_task[task].append(cos[i, j])
        found = [d for d in found if np.isfinite(d["cosine"])]
        if not found:
            return {}
        out = {f"update-{k}": float(np.mean([d[k] for d in found])) for k in ("cosine", "kept")}
        return out | {f"update-cosine-{task}": float(np.mean(c)) for task, c in sorted(by_task.items())}

    def _weights(self, members: Sequence[Update]) -> list[float]:
        """Aggregation weights: rows trained, or under HetLoRA each update's ||dW|| (its sparsity weight)."""
        if self.switches.hetlora:
            norms = [delta_norm(u.adapter, self.alpha) for u in members]
            if sum(norms) > 0:
                return norms
        return [float(u.num_examples) for u in members]

    def _self_prune(self, update: Update) -> Update:
        """Apply HetLoRA's self-pruning rule to a client's reply and to the state the server keeps for it."""
        sent = self.trained_part(update.client_id, self.adapters[update.client_id])
        pruned = self_prune(sent, update.adapter, self.prune_gamma)
        if not pruned:
            return update
        ranks = module_ranks(sent)
        self.pruned[update.client_id] += sum(ranks[m] - k for m, k in pruned.items())
        self.adapters[update.client_id] = truncate_ranks(self.adapters[update.client_id], pruned, self.alpha)
        return Update(
            update.client_id,
            truncate_ranks(update.adapter, pruned, self.alpha),
            update.head,
            update.num_examples,
            update.metrics,
        )

    def summary(self) -> str:
        """One line describing the method."""
        s = self.switches
        groups = len({m.group for m in self.members})
        return (
            f"{self.name}: clustering={s.clustering} ({groups} group(s)), ranks={s.ranks}, "
            f"aggregation={s.aggregation}, laplacian eta={self.eta:g}, server lr={self.server_lr:g}, "
            f"factor split={self.factor_split}"
            + (f", server lr rule={self.server_lr_rule}" if self.server_lr_rule != "fixed" else "")
            + (f", {len(self.dropped)} client(s) dropped (over budget)" if self.dropped else "")
            + (f", rank self-pruning gamma={self.prune_gamma:g}" if s.hetlora else "")
        )
