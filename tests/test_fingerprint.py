"""Client fingerprints: the round-0 gradient trap, privacy mechanics, determinism."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from atlas_flwr.client.fingerprint import (
    FingerprintSettings,
    class_balance_weights,
    epsilon_of,
    example_features,
    privatize,
    projection,
)
from atlas_flwr.client.local import client_data, compute_fingerprint, new_model
from atlas_flwr.common.config import Config
from atlas_flwr.data import make_loader
from atlas_flwr.models.classifier import load_tokenizer


@pytest.fixture()
def tiny_cfg(run_config: dict, tiny_models: dict) -> Config:
    run_config.update(
        {
            "model": tiny_models["bert"],
            "tasks": "sst2,mrpc",
            "clients-per-task": 2,
            "max-samples-per-client": 32,
            "max-length": 32,
        }
    )
    return Config.from_run_config(run_config)


def test_at_round_zero_lora_a_gradients_vanish_and_b_gradients_do_not(tiny_cfg: Config) -> None:
    model = new_model(tiny_cfg, "sst2")
    data = client_data(tiny_cfg, 0)
    batch = next(iter(make_loader(data.train, load_tokenizer(tiny_cfg.model), 8, shuffle=False)))
    labels = batch.pop("labels")
    torch.nn.functional.cross_entropy(model(**batch), labels).backward()
    grads = {n: p.grad for n, p in model.backbone.named_parameters() if p.requires_grad}
    assert all(float(g.abs().sum()) == 0.0 for n, g in grads.items() if "lora_A" in n)
    assert all(float(g.abs().sum()) > 0.0 for n, g in grads.items() if "lora_B" in n)


@pytest.mark.parametrize("kind", ["embedding", "embedding-labels", "lora-grad"])
def test_fingerprint_shape_importance_and_determinism(tiny_cfg: Config, kind: str) -> None:
    settings = FingerprintSettings(kind=kind, dim=16, max_rows=8, seed=3)
    a = compute_fingerprint(tiny_cfg, 0, settings)
    b = compute_fingerprint(tiny_cfg, 0, settings)
    other = compute_fingerprint(tiny_cfg, 2, settings)
    assert a.vector.shape == (16,) and a.num_rows == 8 and math.isinf(a.epsilon)
    assert np.array_equal(a.vector, b.vector)
    assert not np.allclose(a.vector, other.vector)
    assert a.importance.shape == (2,) and (a.importance > 0).all()  # the tiny model has 2 layers
    assert np.linalg.norm(a.vector) <= settings.clip + 1e-6


def test_lora_grad_rows_are_per_example(tiny_cfg: Config) -> None:
    model = new_model(tiny_cfg, "sst2")
    rows = client_data(tiny_cfg, 0).train.select(range(5))
    loader = make_loader(rows, load_tokenizer(tiny_cfg.model), 1, shuffle=False)
    features, labels, _ = example_features(model, loader, "lora-grad", torch.device("cpu"), max_rows=5)
    assert labels.tolist() == rows["labels"]
    n_b = sum(p.numel() for n, p in model.backbone.named_parameters() if "lora_B" in n)
    assert features.shape == (5, n_b)


def test_privatize_clips_every_row_and_noise_costs_epsilon() -> None:
    rng = np.random.default_rng(0)
    features = rng.normal(size=(50, 40)) * 100.0
    settings = FingerprintSettings(dim=8, clip=0.5, seed=1)
    clean, eps = privatize(features, settings, noise_seed=0)
    assert math.isinf(eps) and np.linalg.norm(clean) <= 0.5 + 1e-6
    # One row replaced moves the clipped mean by at most 2 * clip / n: the sensitivity the noise is scaled to.
    changed = features.copy()
    changed[0] = -changed[0] * 7
    moved, _ = privatize(changed, settings, noise_seed=0)
    assert np.linalg.norm(moved - clean) <= 2 * 0.5 / 50 + 1e-6
    noisy, eps_1 = privatize(features, FingerprintSettings(dim=8, clip=0.5, seed=1, noise=1.0), noise_seed=0)
    _, eps_4 = privatize(features, FingerprintSettings(dim=8, clip=0.5, seed=1, noise=4.0), noise_seed=0)
    assert not np.allclose(noisy, clean) and math.isfinite(eps_1) and eps_4 < eps_1


def test_projection_is_shared_by_seed() -> None:
    assert np.array_equal(projection(30, 4, 7), projection(30, 4, 7))
    assert not np.array_equal(projection(30, 4, 7), projection(30, 4, 8))


@pytest.mark.parametrize("noise", [0.7, 1.0, 3.0])
def test_epsilon_is_the_gaussian_mechanisms(noise: float) -> None:
    # Noise is scaled to the sensitivity, so epsilon depends on the multiplier only, and it must not
    # exceed the basic RDP conversion min_a [a / (2 z^2) + ln(1/delta) / (a - 1)] of a Gaussian.
    delta = 1e-5
    eps = epsilon_of(noise, 100, delta)
    assert eps == pytest.approx(epsilon_of(noise, 5000, delta))
    basic = min(a / (2 * noise**2) + math.log(1 / delta) / (a - 1) for a in np.linspace(1.01, 200, 20000))
    assert 0.5 * basic < eps <= basic


def test_unknown_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown fingerprint kind 'pixels'"):
        FingerprintSettings(kind="pixels")


def test_class_balanced_mean_ignores_label_proportions() -> None:
    rng = np.random.default_rng(1)
    pos, neg = rng.normal(size=(1, 12)) + 3, rng.normal(size=(1, 12)) - 3

    def fingerprint(n_pos: int, n_neg: int) -> np.ndarray:
        labels = np.array([1] * n_pos + [0] * n_neg)
        features = np.vstack([np.repeat(pos, n_pos, 0), np.repeat(neg, n_neg, 0)])
        signed = np.hstack([features, (2 * labels[:, None] - 1) * features])
        vector, _ = privatize(signed, FingerprintSettings(dim=6, clip=100.0), 0, class_balance_weights(labels))
        return vector

    np.testing.assert_allclose(fingerprint(10, 90), fingerprint(70, 30), rtol=1e-5, atol=1e-5)
    assert class_balance_weights(np.array([1, 1, 1, 0])).tolist() == [2 / 3, 2 / 3, 2 / 3, 2.0]


@pytest.mark.parametrize("kind", ["embedding", "embedding-labels"])
def test_a_fingerprint_in_slices_equals_the_whole_batch(tiny_cfg: Config, kind: str) -> None:
    # The server sizes a small client's fingerprint to slices of its budget: the features and the importance
    # (a gradient of the batch's mean loss) must not change with the slice size, 3 not dividing the batch.
    model = new_model(tiny_cfg, "sst2")
    rows = client_data(tiny_cfg, 0).train.select(range(16))
    loader = make_loader(rows, load_tokenizer(tiny_cfg.model), 8, shuffle=False)
    whole = example_features(model, loader, kind, torch.device("cpu"), max_rows=16)
    sliced = example_features(model, loader, kind, torch.device("cpu"), max_rows=16, micro_batch=3)
    np.testing.assert_allclose(sliced[0], whole[0], rtol=1e-5, atol=1e-6)
    assert np.array_equal(sliced[1], whole[1])
    np.testing.assert_allclose(sliced[2], whole[2], rtol=1e-4)


def test_an_evaluation_in_slices_equals_the_whole_batch(tiny_cfg: Config) -> None:
    from atlas_flwr.client.train import evaluate

    model = new_model(tiny_cfg, "sst2")
    rows = client_data(tiny_cfg, 0).eval.select(range(20))
    loader = make_loader(rows, load_tokenizer(tiny_cfg.model), 8, shuffle=False)
    whole, sliced = evaluate(model, loader, torch.device("cpu")), evaluate(model, loader, torch.device("cpu"), 3)
    assert sliced["num-examples"] == whole["num-examples"] == 20
    assert sliced["accuracy"] == whole["accuracy"]
    assert sliced["loss"] == pytest.approx(whole["loss"], rel=1e-5)
