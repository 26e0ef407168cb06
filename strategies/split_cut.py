"""Where split learning cuts the model: the deepest block whose client half fits the budget.

Pure Python on plain numbers, priced by the memory model (``memory.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
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


def plan_split_ranks(
    model: ModelShape,
    train: TrainShape,
    budget_bytes: int,
    importance: Sequence[float],
    max_rank: int,
    cut: int | None = None,
    calibration: Calibration | None = None,
    optimizer: str = "adamw",
) -> tuple[int, list[int], dict[str, int]]:
    """Split learning with budget ranks: the client trains what its budget allows below the cut, the server the rest.

    The client's budget prices only its half (:func:`split_client_peak_bytes`): the blocks below the
    cut get the ranks :func:`~strategies.ranks.allocate_ranks` chooses under it, by importance; the
    blocks from the cut up run on the server, at ``max_rank``. ``cut = None`` (``split = auto``) takes
    the deepest cut at which the budget still adapts every block the client holds that has positive
    importance, so that the client keeps as much of the model as it can train.

    Returns
    -------
    tuple
        The cut, one rank per layer of the whole model, and the client half's predicted breakdown.
        Raises ValueError (one line) when no cut lets the budget adapt the client's blocks.
    """
    from strategies.ranks import allocate_ranks

    if len(importance) != model.num_layers:
        raise ValueError(f"importance has {len(importance)} entries: expected one per layer ({model.num_layers})")
    cuts = range(model.num_layers - 1, 0, -1) if cut is None else [cut]
    sent = train.batch * train.seq_len * model.hidden * train.dtype_bytes
    budget = int(budget_bytes)
    for c in cuts:
        if not isinstance(c, int) or not 1 <= c <= model.num_layers - 1:
            raise ValueError(
                f"split point {c!r} is invalid for a {model.num_layers}-layer model: expected 1..{model.num_layers - 1}"
            )
        bottom = replace(model, num_layers=c, pooler=False)
        try:
            allocation = allocate_ranks(
                bottom,
                train,
                budget - sent,
                importance[:c],
                max_rank=max_rank,
                calibration=calibration,
                optimizer=optimizer,
            )
        except ValueError:
            continue  # the frozen bottom alone does not fit: a shallower cut may
        if all(r > 0 for r, w in zip(allocation.ranks, importance[:c], strict=True) if w > 0):
            ranks = list(allocation.ranks) + [max_rank] * (model.num_layers - c)
            parts = dict(allocation.predicted)
            parts["sent_activations"] = sent
            parts["total"] += sent
            return c, ranks, parts
    where = "any cut" if cut is None else f"cut {cut}"
    raise ValueError(f"budget {format_size(budget)} cannot adapt the client's blocks at {where}: raise its memory")
