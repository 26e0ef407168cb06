"""``AtlasStrategy``: the ATLAS pipeline as a Flower Message-API ``Strategy``.

Flower's ``Strategy.start`` runs the rounds. What it cannot express is done around it: before
round 1 a query phase (who the clients are, their fingerprints, the plan of groups and ranks);
after the last round the run's tables and summary. A personalized run has no one global model, so
the strategy keeps every client's adapter and head (``pipeline``) and ignores the ``arrays`` that
Flower's loop hands over. The math lives in ``strategies/``; this module only moves messages.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import flwr
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from atlas_flwr.client.train import seed_for
from atlas_flwr.common.checkpoint import Checkpoint, checkpoint_to_resume, save_checkpoint
from atlas_flwr.common.config import Config
from atlas_flwr.common.errors import AtlasError
from atlas_flwr.common.records import message_bytes
from atlas_flwr.common.results import RunWriter, default_run_name, new_run_dir
from atlas_flwr.server.memory_log import MemoryLog
from atlas_flwr.server.messaging import PollingGrid
from atlas_flwr.server.plan import Plan, plan_federation, plan_from_checkpoint
from atlas_flwr.server.preflight import preflight
from atlas_flwr.server.protocol import (
    collect_updates,
    content_for,
    describe_clients,
    evaluation_groups,
    reply_error,
)
from atlas_flwr.server.report import (
    checkpoint_meta,
    client_rows,
    rank_energy,
    round_line,
    run_summary,
    task_means,
)
from atlas_flwr.server.split_server import SplitClient, plan_split, round_updates, run_split_round, start_round
from strategies.pipeline import ClientInfo, PersonalizedPipeline, resolve_switches


class AtlasStrategy(Strategy):
    """Task clustering, budget ranks, split learning and exact aggregation with Laplacian personalization.

    Every method of the app (``fedavg``, ``hetlora``, ..., ``atlas``) is a preset of this one
    strategy's switches, chosen by ``config.strategy``.

    Parameters
    ----------
    config : Config
        The run's validated config, e.g. ``Config.from_run_config(context.run_config)``.

    Attributes
    ----------
    pipeline : PersonalizedPipeline
        After the query phase: every client's adapter and head, its group and its frozen modules.
    run_dir : Path
        Where the run writes its tables, checkpoints and summary.
    """

    def __init__(self, config: Config) -> None:
        self.cfg = config
        self.switches = resolve_switches(config.strategy, config.clustering, config.ranks, config.aggregation)
        self.pipeline: PersonalizedPipeline | None = None
        self.run_dir: Path | None = None
        self.clients: list[ClientInfo] = []
        self._plan: Plan | None = None
        self._writer: RunWriter | None = None
        self._memory = MemoryLog()
        self._split_choices: list[dict[str, Any]] = []
        self._split: list[SplitClient] | None = None
        self._ckpt: Checkpoint | None = None
        self._evals: dict[int, dict[str, float]] = {}
        self._last_train: dict[int, dict[str, float]] = {}
        self._energy: list[dict[str, Any]] = []
        self._round: dict[str, Any] = {}  # what the current round has measured so far
        self._started = self._plan_seconds = self._longest = 0.0
        self._stopped_by = "num-server-rounds"

    # ---- Flower's Strategy -------------------------------------------------------------------------------

    def summary(self) -> None:
        """Log the method's switches (and, after the query phase, its groups and graph)."""
        text = self.pipeline.summary() if self.pipeline is not None else f"{self.cfg.strategy}: {self.switches}"
        log(INFO, "\t├── %s", text)

    def start(
        self,
        grid: Grid,
        initial_arrays: ArrayRecord | None = None,
        num_rounds: int | None = None,
        timeout: float | None = None,
        train_config: ConfigRecord | None = None,
        evaluate_config: ConfigRecord | None = None,
        evaluate_fn: Callable[[int, ArrayRecord], MetricRecord | None] | None = None,
    ) -> Result:
        """Query phase, then Flower's round loop, then the run's tables.

        ``num_rounds`` and ``timeout`` default to the config's ``num-server-rounds`` and
        ``reply-timeout-seconds``; ``initial_arrays`` is only logged (each client's starting
        state comes from the plan). Replies are polled at 20 ms rather than the Deployment
        Engine's 3 s.
        """
        self._started = time.perf_counter()
        polling = PollingGrid(grid, self._memory.record if self.cfg.measure_memory else None)
        self._query_phase(polling)
        result = super().start(
            polling,
            ArrayRecord() if initial_arrays is None else initial_arrays,
            self.cfg.num_server_rounds if num_rounds is None else num_rounds,
            (self.cfg.reply_timeout_seconds or None) if timeout is None else timeout,  # type: ignore[arg-type]
            train_config,
            evaluate_config,
            evaluate_fn,
        )
        self._finish()
        return result

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Messages to this round's sampled clients, each with its own adapter and head.

        A split round is many exchanges, not one: it runs here, and no message is left for the loop.
        """
        self._round = {"t0": time.perf_counter()}
        if self._skips(server_round):
            return []
        if self._split is not None:
            self._round["split"] = self._split_round(grid, server_round)
            return []
        pipeline, cfg = self._pipeline(), self.cfg
        pool = set(pipeline.trainers())
        trainers = set(pipeline.sample(cfg.fraction_train, cfg.min_train_nodes, seed_for(cfg.seed, server_round, 0x5A)))
        clients = [c for c in self.clients if c.client_id in trainers]
        messages = self._messages(clients, MessageType.TRAIN, server_round, config)
        self._round |= {"clients": clients, "sat-out": pool - trainers, "sampled": float(len(trainers))}
        self._round["io"] = {"bytes-sent": float(sum(message_bytes(m) for m in messages))}
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Check each reply, fold the valid ones into the clients' states (exact, per group, Laplacian)."""
        if "split" in self._round:
            metrics, io, extra = self._round.pop("split")
            self._round |= {"io": io, "extra": extra, "train-metrics": metrics}
            return None, MetricRecord(metrics)
        if "clients" not in self._round:
            return None, None
        cfg, pipeline = self.cfg, self._pipeline()
        clients = self._round["clients"]
        ok, received, failed = self._matched(clients, replies, server_round, "train")
        t1 = time.perf_counter()
        updates, rejected = collect_updates(ok, pipeline, server_round, cfg.precision)
        io = self._round["io"] | {
            "bytes-received": float(received),
            "failures": float(failed + rejected),
            "rejected": float(rejected),
        }
        if len(updates) < min(cfg.min_clients, len(clients)):
            raise AtlasError(
                f"round {server_round}: {len(updates)} valid train replies of {len(clients)}, fewer than "
                f"min-clients = {cfg.min_clients}; see the warnings above"
            )
        self._last_train.update({u.client_id: u.metrics for u in updates})
        metrics = pipeline.aggregate_train(updates, sat_out=self._round["sat-out"])
        metrics["sampled"] = self._round["sampled"]
        # The clients' own training time, summed: what the train phase costs beyond it is messaging and dispatch.
        compute = float(sum(u.metrics.get("train-seconds", 0.0) for u in updates))
        extra = {"aggregate-seconds": time.perf_counter() - t1, "client-train-seconds": compute}
        self._round |= {"io": io, "extra": extra, "train-metrics": metrics}
        return None, MetricRecord(metrics)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One evaluation per distinct (model, validation rows): under FedAvg a task's clients share both."""
        if "io" not in self._round:
            return []
        self._round["t1"] = time.perf_counter()
        shared = evaluation_groups(self.clients, self._pipeline())
        messages = self._messages(list(shared), MessageType.EVALUATE, server_round, config)
        self._round |= {"shared": shared, "eval-sent": float(sum(message_bytes(m) for m in messages))}
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Record the round: metrics per task, the round's row, rank energy, a checkpoint, the progress line."""
        if "shared" not in self._round:
            return None
        shared = self._round["shared"]
        ok, received, failed = self._matched(list(shared), replies, server_round, "evaluate")
        for representative, msg in ok:
            metrics = {k: v for k, v in msg.content.metric_records["metrics"].items() if k != "client-id"}
            for member in shared[representative]:
                self._evals[member.client_id] = {**metrics, "evaluated-by": float(representative.client_id)}
        t0, t1, t3 = self._round["t0"], self._round["t1"], time.perf_counter()
        eval_io = {"bytes-sent": self._round["eval-sent"], "bytes-received": float(received), "failures": float(failed)}
        train_io, extra = self._round["io"], self._round["extra"]
        means = task_means(self._evals, self.clients)
        row: dict[str, Any] = {
            "round": server_round,
            **self._round["train-metrics"],
            **means,
            **{k: train_io[k] + eval_io.get(k, 0.0) for k in train_io},
            **extra,
            "train-seconds": t1 - t0 - extra["aggregate-seconds"],
            "eval-seconds": t3 - t1,
            "round-seconds": t3 - t0,
        }
        self._end_round(server_round, row)
        return MetricRecord(means)

    # ---- around the loop ---------------------------------------------------------------------------------

    def _query_phase(self, grid: Grid) -> None:
        """Describe the clients, then plan (fingerprints, groups, ranks, split cuts) or take the checkpoint's plan."""
        cfg = self.cfg
        preflight(cfg)
        self._ckpt = ckpt = checkpoint_to_resume(cfg.resume_from, cfg.to_dict())
        if ckpt is not None:
            self.run_dir = ckpt.run_dir
        else:
            name = cfg.run_name or default_run_name(cfg.strategy, cfg.seed)
            self.run_dir = new_run_dir(cfg.resolved_output_dir(), name)
        config_json: dict[str, Any] = {"run-config": cfg.to_dict(), "flwr-version": flwr.__version__}
        if ckpt is not None:
            config_json["resumed-after-round"] = ckpt.server_round
        self._writer = writer = RunWriter(self.run_dir, config_json, cfg.tensorboard_dir(self.run_dir))
        self.clients = clients = describe_clients(grid, cfg)
        log(INFO, "%d clients: %s; results in %s", len(clients), ", ".join(f"{c.client_id}:{c.task}" for c in clients),
            self.run_dir)  # fmt: skip
        t_plan = time.perf_counter()
        self._plan = plan = (
            plan_federation(grid, cfg, clients, self.switches) if ckpt is None else plan_from_checkpoint(ckpt, clients)
        )
        self.pipeline = PersonalizedPipeline(
            cfg.strategy,
            self.switches,
            plan.members,
            plan.initial,
            cfg.lora_alpha,
            plan.adjacency,
            cfg.laplacian_eta,
            server_lr=cfg.server_lr,
            factor_split=cfg.factor_split,
            server_lr_rule=cfg.server_lr_rule,
            frozen=plan.frozen,
            dropped=plan.dropped,
            prune_gamma=cfg.hetlora_gamma,
            laplacian_input=cfg.laplacian_input,
        )
        writer.write_json("clusters.json", plan.clusters)
        writer.write_table("ranks", plan.ranks)
        if plan.adjacency is not None:
            ids = [c.client_id for c in clients]
            writer.write_json("adjacency.json", {"client-ids": ids, "a": plan.adjacency.tolist()})
        self._log_plan(plan)
        if cfg.split != "none":
            self._split = self._plan_split()
        self._plan_seconds = time.perf_counter() - t_plan
        if ckpt is not None:
            self._evals = {int(k): v for k, v in ckpt.meta["evals"].items()}
            self._last_train = {int(k): v for k, v in ckpt.meta["last-train"].items()}
            writer.rounds = [dict(r) for r in ckpt.meta["rounds"]]
            self._plan_seconds = float(ckpt.meta["plan-seconds"])
            ckpt.restore_rng()
            log(INFO, "resumed from %s after round %d", ckpt.run_dir, ckpt.server_round)
            energy_file = self.run_dir / "rank-energy.json"
            self._energy = json.loads(energy_file.read_text()) if energy_file.is_file() else []

    def _log_plan(self, plan: Plan) -> None:
        clusters = plan.clusters
        if clusters.get("ari-vs-declared-tasks") is not None and self.switches.clustering == "learned":
            log(INFO, "clusters: k=%d groups %s (ARI %.3f against the declared tasks, for evaluation only)",
                clusters["k"], clusters["groups"], clusters["ari-vs-declared-tasks"])  # fmt: skip
        for row in plan.ranks:
            log(INFO, "client %d %s: ranks [%s], predicted peak %.0f MB of %.0f MB", row["client-id"], row["device"],
                row["ranks-per-layer"], row["predicted-peak-bytes"] / 1e6, row["memory-budget-bytes"] / 1e6)  # fmt: skip

    def _plan_split(self) -> list[SplitClient]:
        if self.switches.ranks not in ("uniform", "budget"):
            raise AtlasError(
                f"split learning plans uniform or budget ranks: strategy {self.cfg.strategy} plans "
                f"ranks = {self.switches.ranks}; use ranks = uniform or budget with split"
            )
        pipeline = self._pipeline()
        # Under budget ranks the plan chose each cut with the ranks below it; else plan_split chooses it.
        cuts = {int(r["client-id"]): int(r["cut"]) for r in self._plan.ranks if "cut" in r}
        states = {c.client_id: pipeline.state_for(c.client_id) for c in self.clients}
        split, choices = plan_split(self.cfg, self.clients, states, cuts)
        self._split_choices = choices
        self._writer.write_table("split", choices)
        for row in choices:
            log(INFO, "client %d: split at block %d, predicted client peak %.0f MB of %.0f MB", row["client-id"],
                row["cut"], row["client-predicted-bytes"] / 1e6, row["memory-budget-bytes"] / 1e6)  # fmt: skip
        return split

    def _skips(self, server_round: int) -> bool:
        """Rounds a resumed run finished before its checkpoint, and rounds past the time limit, send nothing."""
        if self._ckpt is not None and server_round <= self._ckpt.server_round:
            log(INFO, "round %d: done before the checkpoint", server_round)
            return True
        if self._stopped_by != "num-server-rounds":
            log(INFO, "round %d: skipped (%s)", server_round, self._stopped_by)
            return True
        return False

    def _pipeline(self) -> PersonalizedPipeline:
        if self.pipeline is None:
            raise RuntimeError("AtlasStrategy: call start() (the query phase plans the clients) before a round")
        return self.pipeline

    def _messages(
        self, clients: Sequence[ClientInfo], kind: str, server_round: int, config: ConfigRecord
    ) -> list[Message]:
        pipeline = self._pipeline()
        out = []
        # An evaluation runs in slices its client's budget holds (the plan's eval-batch; none in older checkpoints).
        slices = {}
        if kind == MessageType.EVALUATE and self._plan is not None:
            slices = {int(r["client-id"]): int(r.get("eval-batch", 0)) for r in self._plan.ranks}
        for c in clients:
            content = content_for(pipeline, c, server_round, self.cfg.precision)
            content["config"] = ConfigRecord({**dict(config), **dict(content["config"])})
            if kind == MessageType.EVALUATE:
                content["config"]["micro-batch"] = slices.get(c.client_id, 0)
            out.append(Message(content, dst_node_id=c.node_id, message_type=kind, group_id=str(server_round)))
        return out

    def _matched(
        self, clients: Sequence[ClientInfo], replies: Iterable[Message], server_round: int, kind: str
    ) -> tuple[list[tuple[ClientInfo, Message]], int, int]:
        """The good replies paired with their clients in client order (so sums do not depend on arrival),
        the bytes they carried, and how many clients failed or did not answer."""
        by_node = {r.metadata.src_node_id: r for r in replies}
        ok, received, failed = [], 0, 0
        for client in clients:
            reply = by_node.get(client.node_id)
            if (reason := reply_error(reply)) is not None:
                failed += 1
                log(WARNING, "round %d %s: client %d (%s) failed: %s", server_round, kind, client.client_id,
                    client.task, reason)  # fmt: skip
                continue
            received += message_bytes(reply)
            ok.append((client, reply))
        if not ok:
            raise AtlasError(f"round {server_round}: every client failed in '{kind}'; see the warnings above")
        return ok, received, failed

    def _split_round(
        self, grid: Grid, server_round: int
    ) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
        """One round of split steps; each client's bottom and top are folded like a federated update."""
        pipeline, split = self._pipeline(), self._split or []
        bottoms = start_round(split, {c.client_id: pipeline.state_for(c.client_id) for c in split})
        result = run_split_round(grid, split, bottoms, server_round)
        t0 = time.perf_counter()
        updates = round_updates(split, result)
        if len(updates) < min(self.cfg.min_clients, len(split)):
            raise AtlasError(
                f"round {server_round}: {len(updates)} clients finished split training of {len(split)}, fewer than "
                f"min-clients = {self.cfg.min_clients}; see the warnings above"
            )
        self._last_train.update({u.client_id: u.metrics for u in updates})
        metrics = pipeline.aggregate_train(updates)
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

    def _end_round(self, server_round: int, row: dict[str, Any]) -> None:
        cfg, writer, pipeline = self.cfg, self._writer, self._pipeline()
        writer.add_round(row)
        self._energy = [r for r in self._energy if r["round"] < server_round]
        self._energy += rank_energy(pipeline, server_round, cfg.lora_alpha)
        writer.write_table("rank-energy", self._energy)
        meta = checkpoint_meta(cfg, self._plan, self._evals, self._last_train, writer, self._plan_seconds)
        save_checkpoint(self.run_dir, server_round, pipeline.adapters, pipeline.heads, meta)
        log(INFO, "%s", round_line(server_round, cfg.num_server_rounds, row, cfg.tasks))
        self._longest = max(self._longest, row["round-seconds"])
        # Stop when the next round, if as long as the longest so far, would end past the limit.
        limit, elapsed = cfg.time_limit_minutes * 60.0, time.perf_counter() - self._started
        if limit and server_round < cfg.num_server_rounds and elapsed + self._longest > limit:
            self._stopped_by = "time-limit"
            log(WARNING, "time limit %.1f min: stopped after round %d; continue with resume-from = %s",
                cfg.time_limit_minutes, server_round, self.run_dir)  # fmt: skip

    def _finish(self) -> None:
        cfg, writer, pipeline = self.cfg, self._writer, self._pipeline()
        writer.write_clients(client_rows(self.clients, self._evals, self._last_train))
        summary = run_summary(
            cfg,
            self._plan,
            pipeline,
            writer.rounds,
            plan_seconds=self._plan_seconds,
            stopped_by=self._stopped_by,
            resumed_after=None if self._ckpt is None else self._ckpt.server_round,
            wall_seconds=time.perf_counter() - self._started,
        )
        writer.write_summary(summary)
        if self._memory.records:
            self._write_memory()
        if (dp := summary["dp"]) is not None:
            log(INFO, "DP on updates: clip %g, noise %g: epsilon %s at delta %g over %d rounds (%s with the fingerprint)",
                dp["clip"], dp["noise"], _eps(dp["epsilon-updates"]), dp["delta"], dp["rounds"],
                _eps(dp["epsilon-with-fingerprint"]))  # fmt: skip
        log(INFO, "run finished: results in %s", self.run_dir)

    def _write_memory(self) -> None:
        """``memory.csv`` (every reply) and ``memory-clients.csv`` (per client, against its budget)."""
        plan, writer = self._plan, self._writer
        split = {int(r["client-id"]): int(r["client-predicted-bytes"]) for r in self._split_choices}
        predicted = {int(r["client-id"]): int(r.get("predicted-peak-bytes", 0)) for r in plan.ranks} | split
        writer.write_table("memory", self._memory.rows(self.clients))
        per_client = self._memory.per_client(self.clients, predicted)
        writer.write_table("memory-clients", per_client)
        over = [r["client-id"] for r in per_client if r["within-budget"] is False]
        worst = max(per_client, key=lambda r: r["max-working-bytes"] / max(r["budget-bytes"], 1))
        log(INFO, "measured working memory: largest %.0f MB (client %d, budget %.0f MB); clients over budget: %s",
            worst["max-working-bytes"] / 1e6, worst["client-id"], worst["budget-bytes"] / 1e6,
            ", ".join(map(str, over)) or "none")  # fmt: skip


def _eps(value: float | None) -> str:
    return "unbounded" if value is None else f"{value:.2f}"
