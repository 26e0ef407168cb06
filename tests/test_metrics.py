"""Metrics against an independent reference (the confusion-matrix formulas)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from atlas_flwr.client.train import classification_metrics, evaluate, seed_for
from atlas_flwr.data import make_loader


def _reference(labels: np.ndarray, preds: np.ndarray) -> dict[str, float]:
    tp = float(np.sum((preds == 1) & (labels == 1)))
    tn = float(np.sum((preds == 0) & (labels == 0)))
    fp = float(np.sum((preds == 1) & (labels == 0)))
    fn = float(np.sum((preds == 0) & (labels == 1)))
    denom = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return {
        "accuracy": (tp + tn) / len(labels),
        "f1": 2 * tp / (2 * tp + fp + fn),
        "mcc": (tp * tn - fp * fn) / denom if denom else 0.0,
    }


@pytest.mark.parametrize("seed", range(5))
def test_binary_metrics_match_confusion_matrix_formulas(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 200)
    preds = np.where(rng.random(200) < 0.7, labels, 1 - labels)
    got, ref = classification_metrics(labels, preds), _reference(labels, preds)
    for key in ref:
        assert got[key] == pytest.approx(ref[key], abs=1e-12)


def test_constant_predictor_has_zero_mcc() -> None:
    labels = np.array([0, 1, 1, 0, 1])
    assert classification_metrics(labels, np.ones(5, dtype=int))["mcc"] == 0.0


class _FixedModel(torch.nn.Module):
    """Predicts class 1 when the first token id is odd."""

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        odd = (input_ids[:, 0] % 2).float()
        return torch.stack([1 - odd, odd], dim=1)


def test_evaluate_reports_metrics_of_the_models_predictions() -> None:
    from datasets import Dataset
    from transformers import AutoTokenizer

    from atlas_flwr.models.registry import resolve_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_model("minilm-l6").path)
    ids = [[101 + i, 7, 102] for i in range(40)]
    labels = [(i + 1) % 2 if i % 5 else i % 2 for i in range(40)]
    ds = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1, 1, 1]] * 40, "labels": labels})
    out = evaluate(_FixedModel(), make_loader(ds, tokenizer, 16, shuffle=False), torch.device("cpu"))
    preds = np.array([(101 + i) % 2 for i in range(40)])
    ref = _reference(np.array(labels), preds)
    assert out["num-examples"] == 40
    assert out["accuracy"] == pytest.approx(ref["accuracy"]) and out["mcc"] == pytest.approx(ref["mcc"])


def test_seed_for_separates_clients_and_rounds() -> None:
    seeds = {seed_for(42, c, r) for c in range(10) for r in range(10)}
    assert len(seeds) == 100
    assert seed_for(42, 3, 2) == seed_for(42, 3, 2)
