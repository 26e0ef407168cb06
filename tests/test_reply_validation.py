"""Train replies that cannot be aggregated are refused before aggregation, in one line."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from atlas_flwr.common.records import to_record
from atlas_flwr.server.protocol import decode_train_reply
from strategies.pipeline import ClientInfo

CLIENT = ClientInfo(3, 103, "cola", 10, 5)
SENT = (
    {"lora_A": np.zeros((2, 4), np.float32), "lora_B": np.zeros((4, 2), np.float32)},
    {"w": np.zeros(2, np.float32)},
)


def _reply(adapter=None, head=None, metrics=None, drop=(), extra=None) -> Message:
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 0
    records = {
        "adapter": to_record(SENT[0] if adapter is None else adapter),
        "head": to_record(SENT[1] if head is None else head),
        "metrics": MetricRecord(metrics or {"num-examples": 10, "train-loss": 0.5}),
        **(extra or {}),
    }
    for name in drop:
        del records[name]
    return Message(RecordDict(records), dst_node_id=CLIENT.node_id, message_type="train")


def test_a_good_reply_decodes() -> None:
    reply = decode_train_reply(CLIENT, _reply(), SENT)
    assert reply.num_examples == 10 and set(reply.adapter) == {"lora_A", "lora_B"}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"adapter": {**SENT[0], "lora_A": np.full((2, 4), np.nan, np.float32)}}, "'lora_A' holds NaN or Inf"),
        ({"head": {"w": np.array([np.inf, 0], np.float32)}}, "head tensor 'w' holds NaN or Inf"),
        ({"adapter": {**SENT[0], "lora_B": np.zeros((8, 2), np.float32)}}, r"'lora_B' has shape \(8, 2\)"),
        ({"adapter": {**SENT[0], "extra": np.zeros(1, np.float32)}}, "keys differ from those sent: \\['extra'\\]"),
        ({"drop": ("head",)}, "missing records \\['head'\\]"),
        ({"metrics": {"num-examples": 0}}, "num-examples = 0"),
        # One client must not claim any weight it likes: at most the rows it described (10 here).
        ({"metrics": {"num-examples": 1e12}}, r"num-examples = 1000000000000.0: expected a count in 1..10"),
        ({"metrics": {"num-examples": float("inf")}}, "num-examples = inf"),
        ({"metrics": {"num-examples": 11}}, "num-examples = 11"),
        ({"metrics": {"num-examples": [1, 2]}}, r"num-examples = \[1, 2\]"),
        ({"extra": {"config": ConfigRecord({"x": 1})}}, r"unexpected records \['config'\]"),
        ({"extra": {"more": MetricRecord({"x": 1.0})}}, r"unexpected records \['more'\]"),
        # Metrics count against the size limit: 10 MB of them is not an update.
        (
            {"metrics": {"num-examples": 10, "junk": [0.0] * 1_250_000}},
            r"payload of 10000\d{3} bytes exceeds the 65608 bytes",
        ),
    ],
)
def test_bad_replies_are_refused(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match) as info:
        decode_train_reply(CLIENT, _reply(**kwargs), SENT)
    assert "\n" not in str(info.value)
