"""The ServerApp side of the EuroSAT workload: Flower's FedAvg plus the wire codec, central test
evaluation every round, the time limit, and the final model.

Flower's ``FedAvg.start`` runs the round loop. The subclass only encodes the global model on its
way down, decodes each update on its way up (so FedAvg's own weighted average sees float32
weights), and counts the bytes of the real messages. The time limit is checked after the central
evaluation that ends every round: when the next round, taking as long as the longest so far,
would end past the limit, the run stops there and keeps the model it has (at least one round runs).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import flwr
import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg
from safetensors.numpy import save_file

from atlas_flwr.common.checkpoint import checkpoint_to_resume, save_checkpoint
from atlas_flwr.common.codec import State, from_wire_record, to_wire_record
from atlas_flwr.common.config import Config
from atlas_flwr.common.errors import AtlasError
from atlas_flwr.common.records import from_record, message_bytes, to_record
from atlas_flwr.common.results import RunWriter, default_run_name, new_run_dir
from atlas_flwr.eurosat.client import ARRAYS, METRICS
from atlas_flwr.eurosat.data import load_eurosat
from atlas_flwr.eurosat.model import EuroSatCNN, build_model, exchanged_state, load_exchanged, num_parameters
from atlas_flwr.eurosat.train import evaluate

MODEL_FILE = "model.safetensors"


class TimeLimitReached(Exception):
    """Raised between rounds when the next round would end past ``time-limit-minutes``."""


class WireFedAvg(FedAvg):
    """Flower's FedAvg with every model and update in the run's wire format.

    Parameters
    ----------
    precision : str
        ``fp32``, ``fp16`` or ``int8`` (see :mod:`atlas_flwr.common.codec`).
    num_clients : int
        Every round trains on all of them (and waits until they are all connected).
    """

    def __init__(self, precision: str, num_clients: int) -> None:
        super().__init__(
            fraction_train=1.0,
            fraction_evaluate=0.0,  # the test fold is evaluated on the server
            min_train_nodes=num_clients,
            min_available_nodes=num_clients,
        )
        self.precision = precision
        self.round_offset = 0  # rounds already trained before a resume: clients see the run's round numbers
        self.reference: State = {}
        self.io: dict[str, float] = {}
        self.client_metrics: dict[int, dict[str, float]] = {}

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Encode the global model once; the clients will hold exactly its decoded copy."""
        wire = to_wire_record(from_record(arrays), self.precision)
        self.reference = from_wire_record(wire, self.precision)
        messages = list(super().configure_train(server_round + self.round_offset, wire, config, grid))
        self.io = {"bytes-sent": float(sum(map(message_bytes, messages))), "bytes-received": 0.0, "failures": 0.0}
        self.client_metrics = {}  # this round's replies only
        return messages

    def decode_update(self, msg: Message) -> State:
        """The client's new weights: the model it received plus its decoded update (ValueError if malformed)."""
        content = msg.content
        if ARRAYS not in content.array_records or METRICS not in content.metric_records:
            raise ValueError(f"missing the {ARRAYS!r} ArrayRecord or the {METRICS!r} MetricRecord")
        if content.metric_records[METRICS].get("num-examples", 0) <= 0:
            raise ValueError("num-examples is not a positive count")
        update = from_wire_record(content.array_records[ARRAYS], self.precision)
        if set(update) != set(self.reference):
            raise ValueError(f"update keys differ from the model's: {sorted(set(update) ^ set(self.reference))[:3]}")
        for key, value in update.items():
            if value.shape != self.reference[key].shape:
                raise ValueError(f"tensor {key!r} has shape {value.shape}: expected {self.reference[key].shape}")
        return {k: self.reference[k] + update[k] for k in self.reference}

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Decode every update, then Flower's FedAvg averages the weights (weighted by num-examples)."""
        decoded = []
        for msg in replies:
            if msg.has_error():
                self.io["failures"] += 1
                decoded.append(msg)  # FedAvg logs it
                continue
            self.io["bytes-received"] += message_bytes(msg)
            try:
                weights = self.decode_update(msg)
            except ValueError as err:
                self.io["failures"] += 1
                log(WARNING, "round %d: update from node %d rejected: %s", server_round, msg.metadata.src_node_id, err)
                continue
            metrics = dict(msg.content.metric_records[METRICS])
            client_id = int(metrics.pop("client-id", -1))
            self.client_metrics[client_id] = metrics
            msg.content = RecordDict({ARRAYS: to_record(weights), METRICS: MetricRecord(metrics)})
            decoded.append(msg)
        arrays, metrics = super().aggregate_train(server_round, decoded)
        if arrays is None:
            raise AtlasError(f"round {server_round}: no valid update; see the warnings above")
        return arrays, metrics


class CentralEvaluation:
    """Evaluates the global model on the test fold after every round, records the round, applies the time limit.

    Passed to ``FedAvg.start`` as ``evaluate_fn``; it keeps the last global model it saw.
    """

    def __init__(self, cfg: Config, strategy: WireFedAvg, writer: RunWriter, started: float) -> None:
        data = load_eurosat(cfg.resolved_eurosat_data())
        idx = data.test_indices(cfg.max_eval_samples, cfg.seed)
        self.images, self.labels = data.images(idx), data.labels[idx]
        self.cfg, self.strategy, self.writer, self.started = cfg, strategy, writer, started
        self.model = EuroSatCNN()
        self.last_round, self.last_arrays = 0, ArrayRecord()
        self.round_started = time.perf_counter()
        self.longest_round = 0.0
        self.offset = 0  # rounds trained before a resume

    def _checkpoint(self, server_round: int, arrays: ArrayRecord) -> None:
        meta = {"run-config": self.cfg.to_dict(), "workload": "eurosat", "rounds": self.writer.rounds}
        save_checkpoint(self.writer.dir, server_round, {}, {}, meta, from_record(arrays))

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord:
        """Test accuracy and loss of ``arrays``; raises :class:`TimeLimitReached` when no round fits any more."""
        server_round += self.offset
        if self.offset and server_round == self.offset:  # FedAvg's round 0 of a resumed run: already recorded
            self.last_round, self.last_arrays = server_round, arrays
            last = self.writer.rounds[-1]
            return MetricRecord({"accuracy": last["test-accuracy"], "loss": last["test-loss"]})
        load_exchanged(self.model, from_record(arrays))
        metrics = evaluate(self.model, self.images, self.labels, batch_size=self.cfg.eval_batch_size)
        self.last_round, self.last_arrays = server_round, arrays
        now = time.perf_counter()
        row: dict[str, Any] = {
            "round": server_round,
            "test-accuracy": metrics["accuracy"],
            "test-loss": metrics["loss"],
        }
        if server_round > 0:
            clients = list(self.strategy.client_metrics.values())
            seconds = now - self.round_started
            self.longest_round = max(self.longest_round, seconds)
            row |= {
                "train-loss": float(np.mean([c["train-loss"] for c in clients])),
                "client-train-seconds": float(np.mean([c["train-seconds"] for c in clients])),
                **self.strategy.io,
                "round-seconds": seconds,
            }
            log(
                INFO,
                "round %d/%d | train loss %.4f | test accuracy %.4f | down %.2f MB up %.2f MB | %.1f s",
                server_round,
                self.cfg.num_server_rounds,
                row["train-loss"],
                row["test-accuracy"],
                row["bytes-sent"] / 1e6,
                row["bytes-received"] / 1e6,
                seconds,
            )
        self.writer.add_round(row)
        if server_round > 0:
            self._checkpoint(server_round, arrays)
        self.round_started = now
        limit = self.cfg.time_limit_minutes * 60.0
        # Round 0 (the initial model) is never the last: a run trains at least one round.
        if limit and 0 < server_round < self.cfg.num_server_rounds and now - self.started + self.longest_round > limit:
            raise TimeLimitReached(
                f"time limit {self.cfg.time_limit_minutes} min: stopped after round {server_round} "
                f"({now - self.started:.0f} s elapsed, longest round {self.longest_round:.0f} s)"
            )
        return MetricRecord({"accuracy": metrics["accuracy"], "loss": metrics["loss"]})


def save_model(path: Path, arrays: ArrayRecord, metadata: dict[str, str]) -> None:
    """The global model as safetensors (float32 tensors, string metadata)."""
    save_file({k: np.ascontiguousarray(v) for k, v in from_record(arrays).items()}, str(path), metadata=metadata)


def run_eurosat(grid: Grid, cfg: Config) -> Path:
    """FedAvg on EuroSAT for ``num-server-rounds`` rounds (or until the time limit); returns the run directory."""
    started = time.perf_counter()
    ckpt = checkpoint_to_resume(cfg.resume_from, cfg.to_dict())
    if ckpt is not None:
        run_dir = ckpt.run_dir
    else:
        run_dir = new_run_dir(
            cfg.resolved_output_dir(), cfg.run_name or default_run_name(f"eurosat-{cfg.precision}", cfg.seed)
        )
    writer = RunWriter(
        run_dir, {"run-config": cfg.to_dict(), "flwr-version": flwr.__version__}, cfg.tensorboard_dir(run_dir)
    )
    model = build_model(cfg.seed)
    strategy = WireFedAvg(cfg.precision, cfg.num_clients)
    evaluation = CentralEvaluation(cfg, strategy, writer, started)
    initial, done = to_record(exchanged_state(model)), 0
    if ckpt is not None:
        # Flower's FedAvg.start counts from 1: the strategy and the evaluation add the rounds already done.
        done = strategy.round_offset = evaluation.offset = ckpt.server_round
        writer.rounds = [dict(r) for r in ckpt.meta["rounds"]]
        initial = to_record(ckpt.extra)
        ckpt.restore_rng()
        log(INFO, "resumed from %s after round %d", run_dir, done)
    log(
        INFO,
        "EuroSAT FedAvg: %d clients, %s, %d parameters; results in %s",
        cfg.num_clients,
        cfg.precision,
        num_parameters(model),
        run_dir,
    )
    stopped_by = "num-server-rounds"
    try:
        strategy.start(grid, initial, num_rounds=cfg.num_server_rounds - done, evaluate_fn=evaluation)
    except TimeLimitReached as reason:
        log(INFO, "%s", reason)
        stopped_by = "time-limit-minutes"
    rounds = evaluation.last_round
    save_model(
        run_dir / MODEL_FILE,
        evaluation.last_arrays,
        {"rounds": str(rounds), "precision": cfg.precision, "seed": str(cfg.seed), "clients": str(cfg.num_clients)},
    )
    writer.write_clients([{"client-id": k, **v} for k, v in sorted(strategy.client_metrics.items())])
    trained = [r for r in writer.rounds if r["round"] > 0]
    final = writer.rounds[-1]
    writer.write_summary(
        {
            "workload": "eurosat",
            "precision": cfg.precision,
            "clients": cfg.num_clients,
            "partitioner": cfg.partitioner,
            "parameters": num_parameters(model),
            "rounds-planned": cfg.num_server_rounds,
            "rounds-completed": rounds,
            "resumed-after-round": done or None,
            "stopped-by": stopped_by,
            "test-accuracy": final["test-accuracy"],
            "best-test-accuracy": max(r["test-accuracy"] for r in writer.rounds),
            "bytes-sent-per-round": float(np.mean([r["bytes-sent"] for r in trained])) if trained else 0.0,
            "bytes-received-per-round": float(np.mean([r["bytes-received"] for r in trained])) if trained else 0.0,
            "bytes-sent-total": sum(r["bytes-sent"] for r in trained),
            "bytes-received-total": sum(r["bytes-received"] for r in trained),
            "model-file": MODEL_FILE,
            "wall-seconds": time.perf_counter() - started,
        }
    )
    log(INFO, "run finished (%s): test accuracy %.4f; results in %s", stopped_by, final["test-accuracy"], run_dir)
    return run_dir


__all__ = ["MODEL_FILE", "TimeLimitReached", "WireFedAvg", "run_eurosat"]
