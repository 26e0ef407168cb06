"""The server's messages: who the clients are, their fingerprints, and what their replies may hold.

Every reply is checked here before it reaches the aggregate (``decode_train_reply``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from logging import WARNING

import numpy as np
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from atlas_flwr.common.codec import decode_update, held_by_client, to_wire_record
from atlas_flwr.common.config import Config
from atlas_flwr.common.errors import AtlasError
from atlas_flwr.common.records import from_record, message_bytes
from atlas_flwr.common.state import LORA_A_SUFFIX, State, state_digest
from atlas_flwr.server.messaging import exchange
from strategies.pipeline import ClientInfo, PersonalizedPipeline, Update

#: Serialisation overhead allowed on top of the raw bytes of the tensors sent (ArrayRecord headers).
REPLY_SLACK_BYTES = 64 * 1024


def reply_error(reply: Message | None) -> str | None:
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
        if (reason := reply_error(reply)) is not None:
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


def content_for(
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
    # "memory": what the client measured for this message (measure-memory), counted in the size limit too.
    extra = sorted(set(content.array_records) - {"adapter", "head"}) + sorted(
        set(content.metric_records) - {"metrics", "memory"}
    )
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


@dataclass(frozen=True)
class Fingerprints:
    """Every client's fingerprint reply, in client order."""

    vectors: np.ndarray
    importance: list[np.ndarray]
    epsilon: float | None  # None: no noise
    delta: float
    rows: list[int]


def collect_fingerprints(
    grid: Grid, clients: Sequence[ClientInfo], micro_batches: Mapping[int, int] | None = None
) -> Fingerprints:
    """Send ``query.fingerprint`` to every client; every one must answer (clustering needs all).

    ``micro_batches`` gives a client the slice size its fingerprint's forward and backward fit its budget at.
    """
    sizes = micro_batches or {}
    messages = [
        Message(
            RecordDict({"config": ConfigRecord({"micro-batch": sizes.get(c.client_id, 0)})}),
            dst_node_id=c.node_id,
            message_type="query.fingerprint",
            group_id="0",
        )
        for c in clients
    ]
    vectors, importance, eps, rows = [], [], [], []
    delta = 0.0
    for client, reply in zip(clients, exchange(grid, messages), strict=True):
        if (reason := reply_error(reply)) is not None:
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
