"""A classifier cut at block ``s``: the bottom (embeddings, blocks [0, s)) and the top (blocks [s, L), head).

The two halves are *views* of one :class:`SequenceClassifier`: they share its modules, LoRA
included, and run the family's own ``forward`` (attention masks, position ids, rotary
embeddings, block signatures all stay transformers' business). A view is the base model with a
few submodules swapped:

- bottom: the block list truncated to [0, s), the final norm (GPT-2 ``ln_f``, LLaMA ``norm``)
  replaced by the identity, so the output is the hidden state entering block s;
- top: the block list truncated to [s, L), and the embedding stage replaced so that the hidden
  state passed as ``inputs_embeds`` enters block s unchanged (BERT-like families: an injector
  in place of the embeddings module; GPT-2: zero position embeddings and no embedding dropout;
  LLaMA-like: ``inputs_embeds`` already enters the blocks directly).

Running bottom then top equals the full model's forward (tested for every family).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from atlas_flwr.common.errors import ModelError
from atlas_flwr.models.classifier import SequenceClassifier, pool


@dataclass(frozen=True)
class Layout:
    """Where a family keeps its blocks, and what each half must neutralise."""

    blocks: str  # dotted path of the ModuleList of blocks
    embeddings: str | None = None  # module replaced by an injector in the top (BERT-like)
    final_norm: str | None = None  # module replaced by the identity in the bottom
    top_zero: tuple[str, ...] = ()  # embedding tables that must add nothing in the top (GPT-2 wpe)
    top_identity: tuple[str, ...] = ()  # modules that must be skipped in the top (GPT-2 embedding dropout)


LAYOUTS: dict[str, Layout] = {
    "bert": Layout("encoder.layer", embeddings="embeddings"),
    "roberta": Layout("encoder.layer", embeddings="embeddings"),
    "distilbert": Layout("transformer.layer", embeddings="embeddings"),
    "gpt2": Layout("h", final_norm="ln_f", top_zero=("wpe",), top_identity=("drop",)),
    "llama": Layout("layers", final_norm="norm"),
    "qwen2": Layout("layers", final_norm="norm"),
}


class _Injector(nn.Module):
    """Stands in for an embeddings module: returns the hidden state given as inputs_embeds."""

    def forward(self, *args: object, **kwargs: object) -> torch.Tensor:
        for value in (kwargs.get("inputs_embeds"), kwargs.get("input_embeds"), *args):
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                return value
        raise ModelError("the top half was called without the cut-layer activations (inputs_embeds)")


class _ZeroEmbedding(nn.Module):
    """An embedding table that adds nothing (its output is zeros of the right shape)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*ids.shape, self.dim, device=ids.device)


def _get(root: nn.Module, path: str) -> nn.Module:
    module = root
    for part in path.split("."):
        module = module._modules[part]
    return module


def _view(root: nn.Module, replacements: dict[str, nn.Module]) -> nn.Module:
    """A shallow copy of ``root`` with submodules swapped; every other module (and parameter) is shared."""
    new_root = copy.copy(root)
    new_root._modules = dict(root._modules)
    for path, module in replacements.items():
        parent = new_root
        *parents, leaf = path.split(".")
        for part in parents:
            child = copy.copy(parent._modules[part])
            child._modules = dict(child._modules)
            parent._modules[part] = child
            parent = child
        parent._modules[leaf] = module
    return new_root


def num_blocks(model: SequenceClassifier, family: str) -> int:
    """How many transformer blocks the model has."""
    return len(_get(model.backbone.get_base_model(), _layout(family).blocks))


def _layout(family: str) -> Layout:
    if family not in LAYOUTS:
        raise ModelError(f"no split layout for model family {family!r}: expected one of {', '.join(LAYOUTS)}")
    return LAYOUTS[family]


class SplitClassifier:
    """The bottom and top halves of ``model`` cut before block ``cut`` (1 <= cut <= L - 1).

    Parameters
    ----------
    model : SequenceClassifier
        The full classifier; both halves share its modules.
    family : str
        Its family (``bert``, ``roberta``, ``distilbert``, ``gpt2``, ``llama``, ``qwen2``).
    cut : int
        The first block of the top half.
    """

    def __init__(self, model: SequenceClassifier, family: str, cut: int) -> None:
        layout = _layout(family)
        base = model.backbone.get_base_model()
        blocks = _get(base, layout.blocks)
        if not 1 <= cut <= len(blocks) - 1:
            raise ModelError(
                f"split point {cut} is invalid for a {len(blocks)}-block model: expected 1..{len(blocks) - 1}"
            )
        self.model, self.family, self.cut = model, family, cut
        bottom = {layout.blocks: nn.ModuleList(blocks[:cut])}
        if layout.final_norm:
            bottom[layout.final_norm] = nn.Identity()
        top: dict[str, nn.Module] = {layout.blocks: nn.ModuleList(blocks[cut:])}
        if layout.embeddings:
            top[layout.embeddings] = _Injector()
        hidden = base.config.hidden_size
        top |= {name: _ZeroEmbedding(hidden) for name in layout.top_zero}
        top |= {name: nn.Identity() for name in layout.top_identity}
        self._bottom, self._top = _view(base, bottom), _view(base, top)

    def bottom(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Cut-layer activations (batch, seq, hidden): embeddings and blocks [0, cut)."""
        kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None and self.model._accepts_token_types:
            kwargs["token_type_ids"] = token_type_ids
        return self._bottom(**kwargs).last_hidden_state

    def top(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Logits from cut-layer activations: blocks [cut, L), final norm, pooling, head."""
        if self._top is None:
            raise ModelError("this split model dropped its top (a client holds only the bottom)")
        states = self._top(inputs_embeds=hidden, attention_mask=attention_mask).last_hidden_state
        pooled = pool(states, attention_mask, self.model.pooling).to(self.model.head.weight.dtype)  # as forward
        return self.model.head(self.model.dropout(pooled))

    def drop_top(self) -> None:
        """Free blocks [cut, L) on the client, which only ever runs the bottom.

        The bottom view keeps its own block list, so it is unaffected; :meth:`top` is gone.
        """
        del _get(self.model.backbone.get_base_model(), _layout(self.family).blocks)[self.cut :]
        self._top = None

    def parameters(self, side: str) -> list[nn.Parameter]:
        """Trainable parameters of one side: ``client`` (LoRA of blocks [0, cut)) or ``server`` (the rest + head)."""
        if side not in ("client", "server"):
            raise ValueError(f"side {side!r} is invalid: expected 'client' or 'server'")
        client_ids = {id(p) for p in self._bottom.parameters() if p.requires_grad}
        owned = [p for p in self.model.parameters() if p.requires_grad and (id(p) in client_ids) == (side == "client")]
        return owned
