"""The ClientApp side of the EuroSAT workload: decode the model, train locally, send the update back encoded."""

from __future__ import annotations

from logging import INFO

from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.common.logger import log

from atlas_flwr.client.identity import client_identity
from atlas_flwr.client.train import pick_device, seed_for
from atlas_flwr.common.codec import from_wire_record, to_wire_record
from atlas_flwr.common.errors import AtlasError
from atlas_flwr.eurosat.data import client_indices, load_eurosat
from atlas_flwr.eurosat.model import EuroSatCNN, exchanged_state, load_exchanged
from atlas_flwr.eurosat.train import train_local

#: FedAvg's default record names (flwr.serverapp.strategy.FedAvg).
ARRAYS, CONFIG, METRICS = "arrays", "config", "metrics"


def eurosat_train(message: Message, context: Context) -> Message:
    """Train the received global model on this client's partition; reply with the encoded update."""
    cfg, client_id = client_identity(context)
    content = message.content
    if ARRAYS not in content.array_records or CONFIG not in content.config_records:
        raise AtlasError(f"train message lacks the {ARRAYS!r} ArrayRecord or the {CONFIG!r} ConfigRecord")
    server_round = int(content.config_records[CONFIG]["server-round"])
    received = from_wire_record(content.array_records[ARRAYS], cfg.precision)
    model = EuroSatCNN()
    load_exchanged(model, received)
    data = load_eurosat(cfg.resolved_eurosat_data())
    idx = client_indices(
        data,
        client_id,
        cfg.eurosat_clients,
        partitioner=cfg.partitioner,
        alpha=cfg.dirichlet_alpha,
        seed=cfg.seed,
        max_samples=cfg.max_samples_per_client,
    )
    result = train_local(
        model,
        data.images(idx),
        data.labels[idx],
        epochs=cfg.local_epochs,
        batch_size=cfg.batch_size,
        lr=cfg.lr_at(server_round),
        weight_decay=cfg.weight_decay,
        precision=cfg.precision,
        device=pick_device(cfg.device),
        seed=seed_for(cfg.seed, client_id, server_round),
    )
    log(INFO, "client %d round %d: %s (%s)", client_id, server_round, result.summary("images"), cfg.precision)
    new = exchanged_state(model)
    update = {k: new[k] - received[k] for k in new}
    metrics = MetricRecord(
        {
            "client-id": client_id,
            "num-examples": result.num_examples,
            "train-loss": result.loss,
            "train-seconds": result.seconds,
        }
    )
    reply = RecordDict({ARRAYS: to_wire_record(update, cfg.precision), METRICS: metrics})
    return Message(reply, reply_to=message)
