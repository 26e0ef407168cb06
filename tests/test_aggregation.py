"""Aggregation math and the grouped FedAvg strategy, without Flower."""

from __future__ import annotations

import random

import numpy as np
import pytest

from strategies.aggregation import weighted_average
from strategies.grouped_avg import ClientInfo, GroupedAdapterAveraging, TrainReply, make_strategy


def _state(value: float, shape=(2, 3)) -> dict[str, np.ndarray]:
    return {"a": np.full(shape, value, dtype=np.float32), "b": np.full((4,), -value, dtype=np.float32)}


def test_weighted_average_matches_hand_computation() -> None:
    out = weighted_average([_state(1.0), _state(4.0)], [100, 50])
    np.testing.assert_allclose(out["a"], np.full((2, 3), (100 * 1 + 50 * 4) / 150))
    np.testing.assert_allclose(out["b"], np.full((4,), -2.0))
    assert out["a"].dtype == np.float32


@pytest.mark.parametrize(
    ("states", "weights", "match"),
    [
        ([_state(1.0)], [1, 2], "one weight per state"),
        ([_state(1.0), _state(2.0)], [0, 0], "not all zero"),
        ([_state(1.0), _state(2.0)], [1, -1], "non-negative"),
        ([_state(1.0), {"a": np.zeros((2, 3))}], [1, 1], "keys"),
        ([_state(1.0), _state(2.0, shape=(3, 2))], [1, 1], "different shapes"),
    ],
)
def test_weighted_average_refuses_inconsistent_input(states, weights, match) -> None:
    with pytest.raises(ValueError, match=match):
        weighted_average(states, weights)


CLIENTS = [ClientInfo(i, 100 + i, task, 10, 5) for i, task in enumerate(["sst2", "sst2", "cola", "cola"])]


def _replies(seed: int = 0) -> list[TrainReply]:
    rng = np.random.default_rng(seed)
    return [
        TrainReply(c, _state(float(rng.normal())), _state(float(rng.normal()), (2, 2)), num_examples=10 * (i + 1))
        for i, c in enumerate(CLIENTS)
    ]


def test_fedavg_shares_adapter_and_keeps_heads_per_task() -> None:
    strategy = make_strategy("fedavg", _state(0.0), _state(0.0, (2, 2)))
    replies = _replies()
    strategy.aggregate_train(replies)
    adapters = [strategy.state_for(c)[0] for c in CLIENTS]
    heads = [strategy.state_for(c)[1] for c in CLIENTS]
    expected = weighted_average([r.adapter for r in replies], [r.num_examples for r in replies])
    for adapter in adapters:
        np.testing.assert_allclose(adapter["a"], expected["a"])
    sst2_head = weighted_average([replies[0].head, replies[1].head], [10, 20])
    np.testing.assert_allclose(heads[0]["a"], sst2_head["a"])
    np.testing.assert_allclose(heads[1]["a"], sst2_head["a"])
    assert not np.allclose(heads[0]["a"], heads[2]["a"])  # never averaged across tasks


def test_local_only_keeps_each_clients_own_update() -> None:
    strategy = make_strategy("local-only", _state(0.0), _state(0.0, (2, 2)))
    replies = _replies()
    strategy.aggregate_train(replies)
    for reply in replies:
        adapter, head = strategy.state_for(reply.client)
        np.testing.assert_array_equal(adapter["a"], reply.adapter["a"])
        np.testing.assert_array_equal(head["a"], reply.head["a"])


def test_result_does_not_depend_on_reply_order() -> None:
    a = make_strategy("fedavg", _state(0.0), _state(0.0, (2, 2)))
    b = make_strategy("fedavg", _state(0.0), _state(0.0, (2, 2)))
    replies = _replies(3)
    shuffled = replies[:]
    random.Random(1).shuffle(shuffled)
    a.aggregate_train(replies)
    b.aggregate_train(shuffled)
    assert all(np.array_equal(a.state_for(c)[0]["a"], b.state_for(c)[0]["a"]) for c in CLIENTS)


def test_group_without_replies_keeps_its_state() -> None:
    strategy = make_strategy("fedavg", _state(0.0), _state(7.0, (2, 2)))
    strategy.aggregate_train([r for r in _replies() if r.client.task == "sst2"])
    np.testing.assert_array_equal(strategy.state_for(CLIENTS[2])[1]["a"], np.full((2, 2), 7.0))
    metrics = strategy.aggregate_train(_replies())
    assert metrics["num-examples"] == 100


def test_heads_can_never_be_averaged_across_all_clients() -> None:
    with pytest.raises(ValueError, match="across tasks"):
        GroupedAdapterAveraging("x", _state(0.0), _state(0.0), adapter_grouping="all", head_grouping="all")
    with pytest.raises(ValueError, match="unknown strategy 'fedprox'"):
        make_strategy("fedprox", _state(0.0), _state(0.0))
