"""Differential privacy on updates: the clip, the seeded noise and the accounting (issue 20 item 6)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from atlas_flwr.client_app import app as client_app
from atlas_flwr.common.config import Config
from atlas_flwr.common.dp import privatize_update, run_epsilon, update_norm
from atlas_flwr.server_app import run_federation
from atlas_tools.local_grid import LocalGrid


def _states(scale: float) -> tuple[dict, dict]:
    rng = np.random.default_rng(0)
    old = {"a": rng.normal(size=(20, 30)).astype(np.float32), "b": rng.normal(size=(50,)).astype(np.float32)}
    new = {k: v + scale * rng.normal(size=v.shape).astype(np.float32) for k, v in old.items()}
    return new, old


def test_the_whole_update_is_clipped_to_the_norm_and_a_small_one_is_kept() -> None:
    new, old = _states(1.0)
    assert update_norm(new, old) > 5
    clipped = privatize_update(new, old, clip=2.0, noise=0.0, seed=1)
    assert update_norm(clipped, old) == pytest.approx(2.0, rel=1e-5)
    direction = np.concatenate([(new[k] - old[k]).ravel() for k in sorted(new)])
    kept = np.concatenate([(clipped[k] - old[k]).ravel() for k in sorted(new)])
    np.testing.assert_allclose(kept * update_norm(new, old) / 2.0, direction, rtol=1e-3, atol=1e-4)
    small, _ = _states(0.001)
    unchanged = privatize_update(small, old, clip=2.0, noise=0.0, seed=1)
    assert all(np.allclose(unchanged[k], small[k], atol=1e-6) for k in small)


def test_noise_is_seeded_and_scaled_to_the_clip() -> None:
    new, old = _states(0.0)
    one = privatize_update(new, old, clip=0.5, noise=2.0, seed=7)
    assert all(np.array_equal(one[k], privatize_update(new, old, 0.5, 2.0, seed=7)[k]) for k in one)
    assert not np.array_equal(one["a"], privatize_update(new, old, 0.5, 2.0, seed=8)["a"])
    noise = np.concatenate([(one[k] - old[k]).ravel() for k in one])
    assert noise.std() == pytest.approx(1.0, rel=0.1)
    with pytest.raises(ValueError, match="clip 0"):
        privatize_update(new, old, clip=0, noise=1.0, seed=1)


def test_epsilon_composes_over_releases_and_is_unbounded_without_noise() -> None:
    one, three = run_epsilon([1.0], 1e-5), run_epsilon([1.0] * 3, 1e-5)
    assert 0 < one < three < 3 * one  # RDP composes better than adding epsilons
    assert run_epsilon([4.0] * 3, 1e-5) < three
    assert run_epsilon([1.0, 0.0], 1e-5) == float("inf")


def test_a_dp_run_reports_its_epsilon_and_its_updates_are_private(run_config: dict, tiny_models: dict) -> None:
    values = run_config | {
        "strategy": "fedavg",
        "model": tiny_models["bert"],
        "tasks": "sst2",
        "clients-per-task": 2,
        "max-samples-per-client": 16,
        "max-eval-samples": 16,
        "num-server-rounds": 2,
        "batch-size": 8,
        "max-length": 32,
    }
    outcomes = {}
    for name, dp in (("plain", {}), ("dp", {"dp-clip": 0.01, "dp-noise": 1.0})):
        cfg = Config.from_run_config(values | dp | {"run-name": name})
        outcomes[name] = run_federation(LocalGrid(client_app, values | dp, cfg.num_clients), cfg)
    summary = json.loads((outcomes["dp"].run_dir / "summary.json").read_text())
    assert summary["dp"]["epsilon-updates"] == pytest.approx(run_epsilon([1.0, 1.0], 1e-5))
    assert summary["dp"]["epsilon-with-fingerprint"] == summary["dp"]["epsilon-updates"]  # fedavg sends none
    assert json.loads((outcomes["plain"].run_dir / "summary.json").read_text())["dp"] is None
    plain, private = (outcomes[n].strategy.state_for(0)[1]["weight"] for n in ("plain", "dp"))
    assert not np.allclose(plain, private)
