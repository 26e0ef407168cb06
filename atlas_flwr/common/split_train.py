"""One SplitLoRA step, as two halves that only exchange tensors (no Flower here).

Client: ``activations = client.forward(batch)`` → (sent) → server:
``grad, loss = server.step(activations, mask, labels)`` → (sent back) → client:
``client.backward(grad)``. Each side runs AdamW on its own parameters; AdamW updates every
parameter from its own gradient only, so the split run takes exactly the steps that joint
training of the whole model would (tested).

The client keeps the graph of its last forward between the two calls when it can; when the
process that runs the backward is not the one that ran the forward (simulation does not tie a
node to one worker), it recomputes the forward from the same random state, which gives the same
activations and dropout masks.

Random state: each call takes a seed or a CPU generator state (``torch.get_rng_state()``) and
draws its dropout masks from it. Passing the state on (client forward -> server step -> the
client's next forward) draws the masks a federated client's forward of the whole model draws, so
a split round computes what a federated round computes, dropout included.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch

from atlas_flwr.common.errors import AtlasError
from atlas_flwr.models.split import SplitClassifier

Batch = Mapping[str, torch.Tensor]
#: A seed, or a CPU generator state to continue from.
Rng = int | torch.Tensor


def _start(rng: Rng) -> None:
    if isinstance(rng, torch.Tensor):
        torch.set_rng_state(rng)
    else:
        torch.manual_seed(rng)


def _same(a: Rng, b: Rng) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    return a == b


def _inputs(batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    return batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids")


class _AdamWSide:
    """What both halves share: their trainable parameters in a fixed order, and the AdamW state of them."""

    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer

    def optimizer_state(self) -> dict[str, np.ndarray]:
        """AdamW moments and step counts as arrays (the client keeps them in ``context.state`` between steps)."""
        out: dict[str, np.ndarray] = {}
        for i, param in enumerate(self.params):
            for key, value in self.optimizer.state.get(param, {}).items():
                out[f"{i}.{key}"] = value.detach().cpu().numpy().copy()
        return out

    def load_optimizer_state(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Restore :meth:`optimizer_state`; shapes must match these parameters."""
        for name, value in arrays.items():
            index, key = name.split(".", 1)
            param = self.params[int(index)]
            tensor = torch.from_numpy(np.array(value, copy=True))
            if key != "step" and tensor.shape != param.shape:
                raise AtlasError(
                    f"optimizer state {name!r} has shape {tuple(tensor.shape)}: expected {tuple(param.shape)}"
                )
            self.optimizer.state[param][key] = tensor


class ClientSide(_AdamWSide):
    """The client's half: embeddings, blocks [0, cut) and their LoRA, with their AdamW."""

    def __init__(self, split: SplitClassifier, *, lr: float, weight_decay: float) -> None:
        self.split = split
        self.params = split.parameters("client")
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay)
        self._pending: tuple[Rng, torch.Tensor] | None = None

    def forward(self, batch: Batch, seed: Rng) -> torch.Tensor:
        """Cut-layer activations of ``batch`` (a detached copy, to send); the graph is kept for backward.

        Dropout draws from ``seed``; ``torch.get_rng_state()`` afterwards is where the top continues."""
        self.split.model.train()
        _start(seed)  # a recomputation from the same seed or state reproduces the dropout masks
        activations = self.split.bottom(*_inputs(batch))
        self._pending = (seed, activations)
        return activations.detach()

    def backward(self, grad: torch.Tensor, batch: Batch | None = None, seed: Rng | None = None) -> None:
        """Backpropagate the server's gradient through the bottom and take one AdamW step.

        Without the graph of the forward (another process ran it), ``batch`` and ``seed`` recompute it.
        """
        if self._pending is None or (seed is not None and not _same(self._pending[0], seed)):
            if batch is None or seed is None:
                raise AtlasError("a gradient arrived for a forward this client did not run: send the batch and seed")
            self.forward(batch, seed)
        _, activations = self._pending
        if grad.shape != activations.shape or not torch.isfinite(grad).all():
            raise AtlasError(f"gradient of shape {tuple(grad.shape)} is not finite or not {tuple(activations.shape)}")
        self.optimizer.zero_grad(set_to_none=True)
        activations.backward(grad)
        self.optimizer.step()
        self._pending = None


class ServerSide(_AdamWSide):
    """The server's half for one client: blocks [cut, L), their LoRA and the task head, with their AdamW."""

    def __init__(self, split: SplitClassifier, *, lr: float, head_lr: float, weight_decay: float) -> None:
        self.split = split
        self.lr, self.head_lr, self.weight_decay = lr, head_lr, weight_decay
        self.loss_fn = torch.nn.CrossEntropyLoss()
        self._new_optimizer()

    def _new_optimizer(self) -> None:
        names = {id(p): n for n, p in self.split.model.named_parameters()}
        params = self.split.parameters("server")
        groups = [
            {"params": [p for p in params if not names[id(p)].startswith("head.")], "lr": self.lr},
            {"params": [p for p in params if names[id(p)].startswith("head.")], "lr": self.head_lr},
        ]
        self.params = [p for g in groups for p in g["params"]]
        self.optimizer = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=self.weight_decay)

    def restart(self, top: Mapping[str, np.ndarray], head: Mapping[str, np.ndarray]) -> None:
        """Start a round from ``top`` (the adapter of blocks >= cut) and ``head``, with fresh AdamW moments,
        as a federated client starts its local training."""
        from atlas_flwr.common.records import to_torch
        from atlas_flwr.models.classifier import load_adapter_state, load_head_state

        load_adapter_state(self.split.model, to_torch(top))
        load_head_state(self.split.model, to_torch(head))
        self._new_optimizer()

    def step(
        self, activations: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, seed: Rng
    ) -> tuple[torch.Tensor, float]:
        """Forward and backward of the top on received activations, one AdamW step; the activations' gradient."""
        self.split.model.train()
        _start(seed)
        received = activations.detach().requires_grad_(True)
        loss = self.loss_fn(self.split.top(received, attention_mask), labels)
        if not math.isfinite(loss.item()):
            raise AtlasError(f"split training loss became {loss.item()}: lower lr")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return received.grad.detach(), float(loss.item())
