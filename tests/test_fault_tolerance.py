"""Checkpoints, resume, the time limit, client failures and rejected replies (in process, no Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from atlas_flwr.client.device import injected_failure
from atlas_flwr.client_app import app as client_app
from atlas_flwr.common.checkpoint import load_checkpoint, save_checkpoint
from atlas_flwr.common.config import Config
from atlas_flwr.common.errors import AtlasError
from atlas_flwr.common.records import to_record
from atlas_flwr.server.protocol import collect_updates
from atlas_flwr.server_app import run_federation
from atlas_tools.local_grid import LocalGrid
from strategies.pipeline import ClientInfo, Member, PersonalizedPipeline, Switches

#: Columns that measure time: they differ between any two runs.
TIMING = ("seconds",)


@pytest.fixture()
def tiny(run_config: dict, tiny_models: dict) -> dict:
    run_config.update(
        {
            "strategy": "fedavg",
            "model": tiny_models["bert"],
            "tasks": "sst2,mrpc",
            "clients-per-task": 2,
            "max-samples-per-client": 16,
            "max-eval-samples": 16,
            "num-server-rounds": 3,
            "batch-size": 8,
            "lr": 0.01,
            "max-length": 32,
        }
    )
    return run_config


class CrashingGrid(LocalGrid):
    """Dies like a killed server: raises out of the round loop at the ``crash_at``-th train push."""

    def __init__(self, *args, crash_at: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.crash_at, self.train_pushes = crash_at, 0

    def push_messages(self, messages):
        messages = list(messages)
        # A round's first train push: "train", or the step-0 "train.split" that carries the bottoms.
        first = messages and messages[0].metadata.message_type.startswith("train")
        if first and "config" in messages[0].content.config_records:
            first = int(messages[0].content.config_records["config"].get("step", 0)) == 0
        if first:
            self.train_pushes += 1
            if self.train_pushes == self.crash_at:
                raise SystemExit("simulated crash")
        return super().push_messages(messages)


def _run(values: dict, grid_cls=LocalGrid, **grid_kwargs):
    cfg = Config.from_run_config(values)
    grid = grid_cls(client_app, values, cfg.num_clients, **grid_kwargs)
    return run_federation(grid, cfg)


def _untimed(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not any(t in k for t in TIMING)} for r in rows]


def test_checkpoint_round_trip_and_a_corrupt_file_is_refused(tmp_path: Path) -> None:
    adapters = {0: {"a.lora_A.weight": np.arange(6, dtype=np.float32).reshape(2, 3)}, 1: {}}
    heads = {0: {"weight": np.ones((2, 3), np.float32)}, 1: {"weight": np.zeros((2, 3), np.float32)}}
    save_checkpoint(tmp_path, 1, adapters, heads, {"rounds": [{"round": 1}]})
    np.random.seed(5)
    expected = np.random.random(3)
    np.random.seed(5)
    save_checkpoint(tmp_path, 2, adapters, heads, {"rounds": [{"round": 1}, {"round": 2}]})
    files = sorted(p.name for p in (tmp_path / "checkpoint").iterdir())
    assert files == ["round-0002.safetensors", "state.json"]  # the older tensors are gone, no temporaries left
    np.random.seed(0)
    ckpt = load_checkpoint(tmp_path)
    ckpt.restore_rng()
    assert np.array_equal(np.random.random(3), expected)
    assert ckpt.server_round == 2 and ckpt.meta["rounds"][-1] == {"round": 2}
    assert np.array_equal(ckpt.adapters[0]["a.lora_A.weight"], adapters[0]["a.lora_A.weight"])
    assert set(ckpt.heads) == {0, 1}
    tensors = tmp_path / "checkpoint" / "round-0002.safetensors"
    data = bytearray(tensors.read_bytes())
    data[-1] ^= 0xFF
    tensors.write_bytes(bytes(data))
    with pytest.raises(AtlasError, match="do not match the digest"):
        load_checkpoint(tmp_path)
    with pytest.raises(AtlasError, match="holds no checkpoint"):
        load_checkpoint(tmp_path / "elsewhere")


def test_resume_after_a_crash_gives_the_uninterrupted_result(tiny: dict) -> None:
    whole = _run({**tiny, "run-name": "whole"})
    with pytest.raises(SystemExit):
        _run({**tiny, "run-name": "crashed"}, CrashingGrid, crash_at=3)  # dies in round 3, after 2 checkpoints
    crashed = Path(tiny["output-dir"]) / "crashed"
    assert load_checkpoint(crashed).server_round == 2
    resumed = _run({**tiny, "resume-from": str(crashed)})
    assert resumed.run_dir == crashed
    rounds = json.loads((crashed / "rounds.json").read_text())
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert _untimed(rounds) == _untimed(json.loads((whole.run_dir / "rounds.json").read_text()))
    for cid in range(4):
        for got, want in zip(resumed.strategy.state_for(cid), whole.strategy.state_for(cid), strict=True):
            assert set(got) == set(want) and all(np.array_equal(got[k], want[k]) for k in want)
    summary = json.loads((crashed / "summary.json").read_text())
    assert summary["resumed-after-round"] == 2 and summary["rounds"] == 3


def test_a_split_learning_run_resumes_exactly(tiny: dict) -> None:
    values = {**tiny, "split": "1", "num-server-rounds": 2, "tasks": "sst2", "max-samples-per-client": 16}
    whole = _run({**values, "run-name": "split-whole"})
    with pytest.raises(SystemExit):
        _run({**values, "run-name": "split-crashed"}, CrashingGrid, crash_at=2)
    crashed = Path(tiny["output-dir"]) / "split-crashed"
    ckpt = load_checkpoint(crashed)
    # The server halves restart every round from the clients' states, so adapters and heads are all it needs.
    assert ckpt.server_round == 1 and not ckpt.extra
    resumed = _run({**values, "resume-from": str(crashed)})
    assert _untimed(json.loads((crashed / "rounds.json").read_text())) == _untimed(
        json.loads((whole.run_dir / "rounds.json").read_text())
    )
    for cid in range(2):
        for got, want in zip(resumed.strategy.state_for(cid), whole.strategy.state_for(cid), strict=True):
            assert all(np.array_equal(got[k], want[k]) for k in want)


def test_resume_refuses_a_changed_config_and_a_finished_run(tiny: dict) -> None:
    done = _run({**tiny, "num-server-rounds": 1, "run-name": "one"})
    with pytest.raises(AtlasError, match="'lr' = 0.02 differs from the checkpoint's 0.01"):
        _run({**tiny, "num-server-rounds": 2, "lr": 0.02, "resume-from": str(done.run_dir)})
    with pytest.raises(AtlasError, match="already ends round 1"):
        _run({**tiny, "num-server-rounds": 1, "resume-from": str(done.run_dir)})


def test_time_limit_stops_between_rounds_and_leaves_a_resumable_checkpoint(tiny: dict) -> None:
    stopped = _run({**tiny, "time-limit-minutes": 1e-6, "run-name": "limited"})
    summary = json.loads((stopped.run_dir / "summary.json").read_text())
    assert summary["stopped-by"] == "time-limit" and summary["rounds"] == 1
    finished = _run({**tiny, "resume-from": str(stopped.run_dir)})
    assert json.loads((finished.run_dir / "summary.json").read_text())["rounds"] == 3


def test_injected_failures_are_counted_and_the_run_completes(tiny: dict) -> None:
    values = {**tiny, "clients-per-task": 3, "inject-failures": 0.3, "seed": 3}
    expected = [
        sum(injected_failure(3, c, r, 0.3) for c in range(6)) for r in range(1, values["num-server-rounds"] + 1)
    ]
    assert sum(expected) > 0  # the seed injects failures, so the test can fail
    outcome = _run(values)
    rounds = json.loads((outcome.run_dir / "rounds.json").read_text())
    assert [r["failures"] for r in rounds] == expected
    assert all(np.isfinite(r["mean-main-metric"]) for r in rounds)


def test_fewer_valid_replies_than_min_clients_stops_the_run(tiny: dict) -> None:
    with pytest.raises(AtlasError, match="fewer than min-clients = 4"):
        _run({**tiny, "inject-failures": 0.5, "min-clients": 4, "seed": 3})
    with pytest.raises(AtlasError, match="'min-clients' = 9 is not allowed"):
        _run({**tiny, "min-clients": 9})


# Replies that must not reach the aggregate: each case corrupts client 1's reply.
ADAPTER = {"m.lora_A.weight": np.ones((2, 4), np.float32), "m.lora_B.weight": np.ones((4, 2), np.float32)}
HEAD = {"weight": np.ones((2, 4), np.float32)}


def _corrupt(case: str) -> tuple[dict, dict, dict]:
    adapter, head, extra = {k: v * 3 for k, v in ADAPTER.items()}, {k: v * 3 for k, v in HEAD.items()}, {}
    if case == "nan":
        adapter["m.lora_A.weight"][0, 0] = np.nan
    elif case == "inf":
        head["weight"][1, 1] = np.inf
    elif case == "missing-key":
        del adapter["m.lora_B.weight"]
    elif case == "extra-key":
        adapter["n.lora_A.weight"] = np.ones((2, 4), np.float32)
    elif case == "wrong-shape":
        head["weight"] = np.ones((3, 4), np.float32)
    elif case == "rank-above-assigned":
        adapter = {"m.lora_A.weight": np.ones((4, 4), np.float32), "m.lora_B.weight": np.ones((4, 4), np.float32)}
    elif case == "oversized":
        adapter["m.lora_B.weight"] = np.ones((4, 50_000), np.float32)
    elif case == "extra-record":
        extra["padding"] = to_record({"pad": np.zeros(16, np.float32)})
    elif case == "config-record":  # 10 MB riding along in a ConfigRecord
        extra["config"] = ConfigRecord({"blob": "x" * 10_000_000})
    elif case == "metric-junk":  # 10 MB in the metrics record itself
        extra["metrics"] = MetricRecord({"num-examples": 10, "train-loss": 0.1, "junk": [0.0] * 1_250_000})
    elif case == "claims-any-weight":
        extra["metrics"] = MetricRecord({"num-examples": 1e12, "train-loss": 0.1})
    elif case == "infinite-count":
        extra["metrics"] = MetricRecord({"num-examples": float("inf"), "train-loss": 0.1})
    return adapter, head, extra


def _reply(node: int, adapter: dict, head: dict, extra: dict | None = None) -> Message:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
    records = {"adapter": to_record(adapter), "head": to_record(head)}
    records |= {"metrics": MetricRecord({"num-examples": 10, "train-loss": 0.1}), **(extra or {})}
    return Message(RecordDict(records), dst_node_id=node, message_type="train")


def _pipeline() -> PersonalizedPipeline:
    members = [Member(i, "sst2", 0) for i in range(3)]
    initial = {i: (dict(ADAPTER), dict(HEAD)) for i in range(3)}
    return PersonalizedPipeline("t", Switches("none", "uniform", "exact", False), members, initial, 16.0)


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("nan", "holds NaN or Inf"),
        ("inf", "holds NaN or Inf"),
        ("missing-key", "keys differ"),
        ("extra-key", "keys differ"),
        ("wrong-shape", "has shape"),
        ("rank-above-assigned", "rank 4: above the assigned 2"),
        ("oversized", "exceeds the"),
        ("extra-record", "unexpected records ['padding']"),
        ("config-record", "unexpected records ['config']"),
        ("metric-junk", "payload of 10000"),
        ("claims-any-weight", "num-examples = 1000000000000.0: expected a count in 1..10"),
        ("infinite-count", "num-examples = inf"),
    ],
)
def test_a_rejected_reply_leaves_the_aggregate_unaffected(case: str, reason: str, caplog) -> None:
    clients = [ClientInfo(i, 100 + i, "sst2", 10, 5) for i in range(3)]
    good = [(clients[i], _reply(100 + i, {k: v * (i + 1) for k, v in ADAPTER.items()}, HEAD)) for i in (0, 2)]
    reference = _pipeline()
    updates, rejected = collect_updates(good, reference, 1)
    assert rejected == 0
    reference.aggregate_train(updates)

    pipeline = _pipeline()
    bad = (clients[1], _reply(101, *_corrupt(case)))
    updates, rejected = collect_updates([good[0], bad, good[1]], pipeline, 1)
    assert rejected == 1 and [u.client_id for u in updates] == [0, 2]
    assert any(reason in r.getMessage() and "client 1" in r.getMessage() for r in caplog.records)
    pipeline.aggregate_train(updates)
    for cid in range(3):
        for got, want in zip(pipeline.state_for(cid), reference.state_for(cid), strict=True):
            assert all(np.array_equal(got[k], want[k]) for k in want)


class SilentNodeGrid(LocalGrid):
    """The node of client ``silent`` never answers a train message (as if it hung or went offline)."""

    def __init__(self, *args, silent: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.silent_node = 1000 + silent
        self.dropped: set[str] = set()

    def push_messages(self, messages):
        messages = list(messages)
        ids = list(super().push_messages(messages))
        for msg, msg_id in zip(messages, ids, strict=True):
            if msg.metadata.dst_node_id == self.silent_node and msg.metadata.message_type == "train":
                self.dropped.add(msg_id)
        return ids

    def pull_messages(self, message_ids):
        return super().pull_messages([i for i in message_ids if i not in self.dropped])


def test_a_reply_that_never_comes_times_out_and_counts_as_a_failure(tiny: dict, caplog) -> None:
    values = {**tiny, "num-server-rounds": 1, "reply-timeout-seconds": 0.5}
    outcome = _run(values, SilentNodeGrid, silent=3)
    row = json.loads((outcome.run_dir / "rounds.json").read_text())[0]
    assert row["failures"] == 1
    assert any("client 3" in r.getMessage() and "no reply before the timeout" in r.getMessage() for r in caplog.records)
