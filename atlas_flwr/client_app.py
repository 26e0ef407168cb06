"""ClientApp: translates messages to local work and back; holds no algorithm."""

from __future__ import annotations

from logging import INFO

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.logger import log

from atlas_flwr.client.device import device_profile, injected_failure
from atlas_flwr.client.identity import client_identity
from atlas_flwr.client.local import client_data, compute_fingerprint, fingerprint_settings, run_evaluate, run_train
from atlas_flwr.client.mods import measure_memory, one_line_errors
from atlas_flwr.client.split_client import split_step
from atlas_flwr.client.train import pick_device, seed_for
from atlas_flwr.common.codec import encode_update, from_wire_record
from atlas_flwr.common.dp import privatize_states
from atlas_flwr.common.errors import AtlasError
from atlas_flwr.common.quiet import quiet_libraries
from atlas_flwr.common.records import to_numpy, without_modules
from atlas_flwr.eurosat.client import eurosat_train

quiet_libraries()


# measure_memory inside one_line_errors: an error reply carries no content to add to.
app = ClientApp(mods=[one_line_errors, measure_memory])


def _states(message: Message, precision: str) -> tuple[dict, dict]:
    content = message.content
    for name in ("adapter", "head"):
        if name not in content.array_records:
            raise AtlasError(f"message {message.metadata.message_type!r} lacks the {name!r} ArrayRecord")
    return (
        from_wire_record(content.array_records["adapter"], precision),
        from_wire_record(content.array_records["head"], precision),
    )


@app.query("describe")
def describe(message: Message, context: Context) -> Message:
    """Tell the server who this client is: id, task, data sizes and memory budget (no data)."""
    cfg, client_id = client_identity(context)
    data = client_data(cfg, client_id)
    profile = device_profile(context, cfg, client_id)
    record = ConfigRecord(
        {
            "client-id": client_id,
            "task": data.task,
            "num-train": len(data.train),
            "num-eval": len(data.eval),
            "eval-digest": data.eval_digest,
            "device-profile": profile.name,
            "memory-bytes": profile.memory_bytes,
            "max-rank": profile.max_rank,
            "device": pick_device(cfg.device).type,
        }
    )
    return Message(RecordDict({"client": record}), reply_to=message)


def _micro_batch(message: Message) -> int:
    """The slice size the server priced this client's forward for (0: whole batches)."""
    config = message.content.config_records.get("config")
    return max(int(config.get("micro-batch", 0)), 0) if config is not None else 0


@app.query("fingerprint")
def fingerprint(message: Message, context: Context) -> Message:
    """Reply with the task fingerprint: projected, clipped, optionally noised; plus layer importance."""
    cfg, client_id = client_identity(context)
    fp = compute_fingerprint(cfg, client_id, fingerprint_settings(cfg), _micro_batch(message))
    arrays = ArrayRecord({"vector": Array(fp.vector), "importance": Array(fp.importance.astype(np.float64))})
    metrics = MetricRecord(
        {
            "client-id": client_id,
            "num-rows": fp.num_rows,
            # inf (no noise) is not a valid metric value for every transport: -1 stands for "no DP".
            "epsilon": fp.epsilon if np.isfinite(fp.epsilon) else -1.0,
            "delta": fp.delta,
        }
    )
    return Message(RecordDict({"fingerprint": arrays, "metrics": metrics}), reply_to=message)


@app.train()
def train(message: Message, context: Context) -> Message:
    """Train the received adapter and head locally; reply with both and the train loss."""
    if context.run_config.get("workload") == "eurosat":
        return eurosat_train(message, context)
    cfg, client_id = client_identity(context)
    server_round = int(message.content.config_records["config"]["server-round"])
    if cfg.inject_failures and injected_failure(cfg.seed, client_id, server_round, cfg.inject_failures):
        raise AtlasError(f"injected failure (inject-failures = {cfg.inject_failures}) in round {server_round}")
    adapter, head = _states(message, cfg.precision)
    frozen = {m for m in str(message.content.config_records["config"].get("frozen-modules", "")).split(",") if m}
    new_adapter, new_head, result = run_train(cfg, client_id, server_round, adapter, head, frozen)
    adapter = without_modules(adapter, frozen)  # only what was trained goes back: the frozen modules are the server's
    log(INFO, "client %d round %d: %s", client_id, server_round, result.summary())
    new_adapter, new_head = to_numpy(new_adapter), to_numpy(new_head)
    values = {
        "client-id": client_id,
        "num-examples": result.num_examples,
        "train-loss": result.loss,
        "train-seconds": result.seconds,
        "train-steps": result.steps,
    }
    if cfg.dp_clip > 0:  # clip and noise the whole update (adapter and head) before it leaves the client
        seed = seed_for(cfg.seed, client_id, server_round, 0xD9)
        new_adapter, new_head, values["update-norm"] = privatize_states(
            (new_adapter, new_head), (adapter, head), cfg.dp_clip, cfg.dp_noise, seed
        )
    metrics = MetricRecord(values)
    content = RecordDict(
        {
            "adapter": encode_update(new_adapter, adapter, cfg.precision),
            "head": encode_update(new_head, head, cfg.precision),
            "metrics": metrics,
        }
    )
    return Message(content, reply_to=message)


@app.train("split")
def train_split(message: Message, context: Context) -> Message:
    """One split-learning step: apply the received gradient, send the next activations (or the bottom)."""
    cfg, client_id = client_identity(context)
    return split_step(message, context, cfg, client_id)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """Evaluate the received adapter and head on the task's validation rows."""
    cfg, client_id = client_identity(context)
    adapter, head = _states(message, cfg.precision)
    metrics = run_evaluate(cfg, client_id, adapter, head, _micro_batch(message))
    return Message(RecordDict({"metrics": MetricRecord({"client-id": client_id, **metrics})}), reply_to=message)


__all__ = ["app"]
