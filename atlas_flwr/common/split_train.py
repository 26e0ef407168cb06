"""One SplitLoRA step, as two halves that only exchange tensors (no Flower here).

Client: ``activations = client.forward(batch)`` → (sent) → server:
``grad, loss = server.step(activations, mask, labels)`` → (sent back) → client:
``client.backward(grad)``; the server's AdamW step for it follows (``server.settle()``, called by its next
``step`` or at the end). Each side runs AdamW on its own parameters; AdamW updates every
parameter from its own gradient only, so the split run takes exactly the steps that joint
training of the whole model would (tested).

The client keeps the graph of its last forward between the two calls when it can; when the
process that runs the backward is not the one that ran the forward (simulation does not tie a
node to one worker), it recomputes the forward from the same random state, which gives the same
activations and dropout masks.

Random state: each call takes a seed or an :class:`RngState` (the CPU generator's state and, on CUDA,
the device generator's, where dropout draws its masks there) and draws its dropout masks from it.
Passing the state on (client forward -> server step -> the client's next forward) draws the masks a
federated client's forward of the whole model draws, so a split round computes what a federated
round computes, dropout included.

Devices: each half computes on its own device. On CUDA it runs in fp16 autocast, as
``train.train_local`` does, and the two halves share one dynamic loss scale (:class:`LossScale`, the
rule of ``torch.amp.GradScaler``): the server scales the loss, the activations' gradient crosses the
cut scaled, and each half unscales its own gradients. A step is taken only when neither half's
gradients overflowed, as GradScaler skips a step of the whole model. The server learns whether the
client's half overflowed from the client's next message, so it takes each step one message late,
still before its next forward (:meth:`ServerSide.settle`).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from atlas_flwr.common.compute import autocast
from atlas_flwr.common.errors import AtlasError
from atlas_flwr.models.split import SplitClassifier

Batch = Mapping[str, torch.Tensor]
CPU = torch.device("cpu")


@dataclass(frozen=True, eq=False)  # tensors have no boolean ==: compare with same_as
class RngState:
    """Where the random generators stand: the CPU one and, where a CUDA half drew its dropout, the device's."""

    cpu_state: torch.Tensor
    cuda_state: torch.Tensor | None = None

    @classmethod
    def now(cls, device: torch.device = CPU, carry: object = None) -> RngState:
        """The generators' state now: the CUDA one where ``device`` is CUDA. A CPU half draws nothing from the
        CUDA generator, so it passes on the CUDA state it received (``carry``) to the CUDA half after it."""
        if device.type == "cuda":
            return cls(torch.get_rng_state(), torch.cuda.get_rng_state(device))
        return cls(torch.get_rng_state(), carry.cuda_state if isinstance(carry, RngState) else None)

    def same_as(self, other: object) -> bool:
        """Whether ``other`` is the same state (a seed never is)."""
        if not isinstance(other, RngState) or (self.cuda_state is None) != (other.cuda_state is None):
            return False
        return torch.equal(self.cpu_state, other.cpu_state) and (
            self.cuda_state is None or torch.equal(self.cuda_state, other.cuda_state)
        )


#: A seed (as ``torch.manual_seed`` takes it: a federated client's start), or a state to continue from.
Rng = int | RngState


def rng_arrays(rng: Rng) -> dict[str, np.ndarray]:
    """``rng`` as arrays for a message or ``context.state`` (:func:`rng_from` reads them back)."""
    if isinstance(rng, int):
        return {"seed": np.array([rng], dtype=np.int64)}
    out = {"rng": rng.cpu_state.numpy()}
    if rng.cuda_state is not None:
        out["cuda-rng"] = rng.cuda_state.cpu().numpy()
    return out


def rng_from(arrays: Mapping[str, np.ndarray]) -> Rng:
    """The seed or state that :func:`rng_arrays` wrote."""
    if "seed" in arrays:
        return int(arrays["seed"][0])
    cuda = arrays.get("cuda-rng")
    return RngState(
        torch.from_numpy(np.array(arrays["rng"], copy=True)),
        None if cuda is None else torch.from_numpy(np.array(cuda, copy=True)),
    )


def _start(rng: Rng, device: torch.device) -> None:
    if isinstance(rng, RngState):
        torch.set_rng_state(rng.cpu_state)
        if device.type == "cuda" and rng.cuda_state is not None:
            torch.cuda.set_rng_state(rng.cuda_state, device)
    else:
        torch.manual_seed(rng)  # seeds the CPU and every CUDA generator, as a federated client's start does


def _same(a: Rng, b: Rng) -> bool:
    return a.same_as(b) if isinstance(a, RngState) else a == b


def _inputs(batch: Batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    ids, mask, types = batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids")
    return ids.to(device), mask.to(device), None if types is None else types.to(device)


#: torch.amp.GradScaler's defaults, read from its signature so that both follow torch.
_SCALER = {name: p.default for name, p in inspect.signature(torch.amp.GradScaler.__init__).parameters.items()}


@dataclass
class LossScale:
    """One dynamic loss scale for both halves, with ``torch.amp.GradScaler``'s rule and defaults.

    GradScaler cannot serve the cut itself: it keeps its overflow flags per optimizer in one process,
    and the two halves' optimizers live in two. A fresh one per round, as ``train_local`` makes a fresh
    GradScaler per call. Disabled (scale 1, never updated) where the loss is not scaled (the CPU, fp32).
    """

    enabled: bool = True
    scale: float = field(default_factory=lambda: float(_SCALER["init_scale"]))
    clean_steps: int = 0

    def __post_init__(self) -> None:
        if not self.enabled:
            self.scale = 1.0

    def update(self, overflow: bool) -> None:
        """Back off after an overflow; grow after ``growth_interval`` clean steps in a row."""
        if not self.enabled:
            return
        if overflow:
            self.scale *= _SCALER["backoff_factor"]
            self.clean_steps = 0
            return
        self.clean_steps += 1
        if self.clean_steps == _SCALER["growth_interval"]:
            self.scale *= _SCALER["growth_factor"]
            self.clean_steps = 0


def unscale(params: Sequence[torch.nn.Parameter], scale: float) -> bool:
    """Whether any gradient of ``params`` is not finite; then divide them by ``scale`` (a power of two: exact).

    The check comes first, as GradScaler's: once the scale has fallen below 1, unscaling could itself overflow."""
    grads = [p.grad for p in params if p.grad is not None]
    overflow = not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()) if grads else False
    for grad in grads:
        grad.mul_(1.0 / scale)
    return overflow


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
            # AdamW keeps its step counts on the CPU (not capturable) and its moments beside the parameter.
            self.optimizer.state[param][key] = tensor if key == "step" else tensor.to(param.device)


class ClientSide(_AdamWSide):
    """The client's half: embeddings, blocks [0, cut) and their LoRA, with their AdamW, on ``device``."""

    def __init__(self, split: SplitClassifier, *, lr: float, weight_decay: float, device: torch.device = CPU) -> None:
        self.split, self.device = split, device
        split.model.to(device)
        self.params = split.parameters("client")
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay)
        self._pending: tuple[Rng, torch.Tensor] | None = None

    def forward(self, batch: Batch, seed: Rng) -> torch.Tensor:
        """Cut-layer activations of ``batch`` (a detached copy, to send); the graph is kept for backward.

        Dropout draws from ``seed``; ``RngState.now(device)`` afterwards is where the top continues."""
        self.split.model.train()
        _start(seed, self.device)  # a recomputation from the same seed or state reproduces the dropout masks
        with autocast(self.device):
            activations = self.split.bottom(*_inputs(batch, self.device))
        self._pending = (seed, activations)
        return activations.detach()

    def backward(
        self,
        grad: torch.Tensor,
        batch: Batch | None = None,
        seed: Rng | None = None,
        *,
        scale: float | None = None,
        skip: bool = False,
    ) -> bool:
        """Backpropagate the server's gradient through the bottom and take one AdamW step; whether this half
        overflowed.

        Without the graph of the forward (another process ran it), ``batch`` and ``seed`` recompute it.
        ``scale`` is the loss scale the gradient carries (None: the loss was not scaled, and a gradient that
        is not finite is an error); with it, the step is skipped when this half's gradients overflow or
        ``skip`` says the server's did.
        """
        if self._pending is None or (seed is not None and not _same(self._pending[0], seed)):
            if batch is None or seed is None:
                raise AtlasError("a gradient arrived for a forward this client did not run: send the batch and seed")
            self.forward(batch, seed)
        _, activations = self._pending
        if grad.shape != activations.shape or (scale is None and not torch.isfinite(grad).all()):
            raise AtlasError(f"gradient of shape {tuple(grad.shape)} is not finite or not {tuple(activations.shape)}")
        self.optimizer.zero_grad(set_to_none=True)
        activations.backward(grad.to(self.device, activations.dtype))
        overflow = scale is not None and unscale(self.params, scale)
        if not (overflow or skip):
            self.optimizer.step()
        self._pending = None
        return overflow


class ServerSide(_AdamWSide):
    """The server's half for one client: blocks [cut, L), their LoRA and the task head, with their AdamW.

    ``loss_scaling``: scale the loss with one :class:`LossScale` for both halves, for a client whose bottom
    runs in fp16 autocast on CUDA (wherever this half runs); off for a client on the CPU (fp32).
    """

    def __init__(
        self,
        split: SplitClassifier,
        *,
        lr: float,
        head_lr: float,
        weight_decay: float,
        device: torch.device = CPU,
        loss_scaling: bool = False,
    ) -> None:
        self.split, self.device, self.loss_scaling = split, device, loss_scaling
        split.model.to(device)
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
        self.loss_scale = LossScale(enabled=self.loss_scaling)  # fresh each round, as train_local's GradScaler
        self._overflow: bool | None = None  # this half's overflow in the step not yet taken (None: none pending)

    def restart(self, top: Mapping[str, np.ndarray], head: Mapping[str, np.ndarray]) -> None:
        """Start a round from ``top`` (the adapter of blocks >= cut) and ``head``, with fresh AdamW moments
        and loss scale, as a federated client starts its local training."""
        from atlas_flwr.common.records import to_torch
        from atlas_flwr.models.classifier import load_adapter_state, load_head_state

        load_adapter_state(self.split.model, to_torch(top))
        load_head_state(self.split.model, to_torch(head))
        self._new_optimizer()

    def step(
        self,
        activations: torch.Tensor,
        attention_mask: torch.Tensor,
        labels: torch.Tensor,
        seed: Rng,
        client_overflow: bool = False,
    ) -> tuple[torch.Tensor, float]:
        """Settle the previous step (``client_overflow``: the client's half overflowed in it), then forward and
        backward the top on received activations; the activations' gradient, scaled by ``loss_scale.scale``.

        This step's AdamW update waits for :meth:`settle`, which the next call or the round's end makes."""
        self.settle(client_overflow)
        self.split.model.train()
        _start(seed, self.device)
        received = activations.to(self.device).detach().requires_grad_(True)
        with autocast(self.device):
            loss = self.loss_fn(self.split.top(received, attention_mask.to(self.device)), labels.to(self.device))
        if not math.isfinite(loss.item()):
            raise AtlasError(f"split training loss became {loss.item()}: lower lr")
        self.optimizer.zero_grad(set_to_none=True)
        (loss * self.loss_scale.scale if self.loss_scale.enabled else loss).backward()
        self._overflow = self.loss_scale.enabled and unscale(self.params, self.loss_scale.scale)
        self.next_rng = RngState.now(self.device, carry=seed)  # where the client's next forward continues
        return received.grad.detach(), float(loss.item())

    @property
    def pending(self) -> bool:
        """Whether a step waits for :meth:`settle` (a half's top is final only when none does)."""
        return self._overflow is not None

    @property
    def overflowed(self) -> bool:
        """Whether this half's gradients overflowed in the step not yet settled (the client then skips too)."""
        return bool(self._overflow)

    def settle(self, client_overflow: bool = False) -> None:
        """Take the pending AdamW step unless either half overflowed, and update the loss scale."""
        if self._overflow is None:
            return
        overflow = self._overflow or client_overflow
        if not overflow:
            self.optimizer.step()
        self.loss_scale.update(overflow)
        self._overflow = None
