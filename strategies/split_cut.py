"""Where split learning cuts the model: the deepest block whose client half fits the budget.

Pure Python on plain numbers, priced by the memory model (``memory.py``).
"""

from __future__ import annotations

from dataclasses import replace

from atlas_flwr.common.devices import format_size, parse_size
from strategies.memory import Calibration, ModelShape, RankSpec, TrainShape, predict_peak_bytes


def split_client_peak_bytes(
    model: ModelShape,
    train: TrainShape,
    ranks_per_layer: RankSpec,
    cut: int,
    optimizer: str = "adamw",
    calibration: Calibration | None = None,
) -> dict[str, int]:
    """Predicted peak of a split-learning client that holds the embeddings and blocks [0, cut).

    The client is the model truncated to ``cut`` blocks (no pooler, no head), with the LoRA of those
    blocks, plus the cut-layer activations it sends (``batch x seq x hidden``).

    Parameters
    ----------
    model, train, optimizer, calibration
        As in :func:`predict_peak_bytes`.
    ranks_per_layer : sequence, one entry per layer of the whole model
        Only the first ``cut`` entries matter.
    cut : int
        First block of the server's half, ``1 <= cut <= num_layers - 1``.

    Returns
    -------
    dict[str, int]
        The :func:`predict_peak_bytes` breakdown of the bottom, plus ``sent_activations``, and total.
    """
    if not isinstance(cut, int) or not 1 <= cut <= model.num_layers - 1:
        raise ValueError(
            f"split point {cut!r} is invalid for a {model.num_layers}-layer model: expected 1..{model.num_layers - 1}"
        )
    ranks = list(ranks_per_layer)
    if len(ranks) != model.num_layers:
        raise ValueError(f"got {len(ranks)} per-layer ranks for a {model.num_layers}-layer model")
    bottom = replace(model, num_layers=cut, pooler=False)
    parts = predict_peak_bytes(bottom, train, ranks[:cut], optimizer, calibration)
    parts["sent_activations"] = train.batch * train.seq_len * model.hidden * train.dtype_bytes
    parts["total"] += parts["sent_activations"]
    return parts


def choose_split(
    model: ModelShape,
    train: TrainShape,
    budget_bytes: float | str,
    ranks_per_layer: RankSpec,
    optimizer: str = "adamw",
    calibration: Calibration | None = None,
) -> tuple[int, dict[str, int]]:
    """The deepest cut whose client half fits the budget, and its predicted breakdown.

    Deeper cuts keep more of the model (and its compute) on the client and send the same activation
    size, so the deepest that fits is chosen. Raises ValueError (one line) when even cut 1 does not fit.
    """
    budget = int(parse_size(budget_bytes) if isinstance(budget_bytes, str) else budget_bytes)
    for cut in range(model.num_layers - 1, 0, -1):
        parts = split_client_peak_bytes(model, train, ranks_per_layer, cut, optimizer, calibration)
        if parts["total"] <= budget:
            return cut, parts
    need = split_client_peak_bytes(model, train, ranks_per_layer, 1, optimizer, calibration)["total"]
    raise ValueError(f"budget {format_size(budget)} is below the {format_size(need)} a client needs with one block")
