"""Peak memory of one LoRA training step (the memory model).

Ranks under a budget are chosen in ``ranks.py`` and the split cut in ``split_cut.py``, both priced here.

Pure Python on plain numbers (no torch): the server can plan ranks for a client it has never seen run.

Memory model (bytes) of one step of a transformer with frozen base weights and LoRA adapters:

- ``frozen_weights``: every base parameter x ``dtype_bytes`` (see :meth:`ModelShape.frozen_param_count`).
- ``lora_params``: sum over adapted projections of ``r * (in + out)``, kept in fp32 (``adapter_bytes``).
- ``lora_grads``: the same again: only the adapters are trainable, so only they get gradients.
- ``optimizer_state``: AdamW keeps two fp32 moments per trainable parameter (SGD none).
- ``activations``: tensors saved for backward (constants in :class:`Calibration`). Every layer from the
  first adapted one to the top stores them, adapted or not: the gradient reaching an early adapter has to
  flow back through all the layers above it. Layers below the first adapter store nothing.
- ``workspace``: transient tensors at the peak plus a fixed allocator/library allowance. On the CPU the peak
  comes at the end of the forward pass (``torch.profiler`` memory events, MiniLM 16 x 128): every saved
  tensor is alive plus the top layer's output and temporaries, about a quarter of one layer's activations.

Derivation of the activation constants. Korthikanti et al. 2022 ("Reducing Activation Recomputation in
Large Transformer Models", Sec. 4.1) count ``34 s b h + 5 a s^2 b`` bytes per layer for full fp16 training
with no recomputation and ``i = 4h``: 16 two-byte tensors of width h (the FFN ones of width i count 4 each)
plus two one-byte dropout masks, and per attention head two two-byte ``s x s`` tensors (softmax output and
its dropout) plus a one-byte mask. With *frozen* base weights autograd does not keep the input of a frozen
linear layer (a matmul keeps its input only to form the weight's gradient), so the inputs of the QKV
projections (1), the attention output projection (1), the FFN up projection (1) and the FFN down projection
(4 = i/h) drop out. What remains, in elements of ``dtype_bytes``: Q, K, V and two LayerNorm inputs (5 of
width h), the GeLU input (1 of width i), softmax output and attention dropout (2 of size a s^2 per sample);
plus the dropout masks (2 per token-hidden, 1 per score) and the LayerNorm mean/rstd (4 per token). Each
adapted projection adds its LoRA-dropout output (width ``in``) with its mask, and the ``lora_A`` output
(width r) kept for ``lora_B``. Activations written as Python-level op chains keep more than the GeLU input
(GPT-2's ``gelu_new``: 4 tensors of width i, see :data:`FFN_ACTIVATION_SAVES`).

CPU and GPU differ: CUDA's fused dropout keeps a bool mask (1 byte), PyTorch's CPU dropout keeps a mask
in the input's dtype (4 bytes in fp32), and GPU clients train in fp16 autocast with fused attention. The
defaults of :class:`Calibration` are the CPU's; ``Calibration.for_device("cuda")`` is the GPU variant,
measured on an H200 (see there). Counting saved tensors (``torch.autograd.graph.saved_tensors_hooks``) on
the project's classifier (PEFT LoRA, SDPA attention, which on the CPU with dropout runs the math path and keeps the
``s x s`` tensors) matches this count to within 3.5% (the first adapted layer keeps slightly less: its
input needs no gradient, so neither its LoRA-dropout masks nor, with query/value targets, the scaled query).
Fused attention kernels (SDPA flash / memory-efficient on GPU) keep no ``s x s`` tensors: the CUDA
calibration has ``act_attn = mask_attn = 0``.

Validation (``benchmarks/memory_calibration.py``, results in ``benchmarks/results/memory``): peak RSS of
real training steps in fresh processes, 7 configurations (MiniLM-L6 with uniform and heterogeneous ranks,
a random-init 8-layer BERT and 6-layer GPT-2), all within 3% of the prediction; the two workspace
constants are a least-squares fit on three of them, the other four are held out. On CUDA
(``benchmarks/results/memory-cuda``: ``torch.cuda.max_memory_allocated``, fp16 autocast) the same seven
configurations and one measured after the fit are within 2.4%.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

Target = tuple[int, int]
RankSpec = Sequence[int] | Sequence[Sequence[int]] | Sequence[Mapping[str, int]]

DEFAULT_CANDIDATE_RANKS = (0, 1, 2, 4, 8, 16, 32)
#: fp32 moment tensors kept per trainable parameter.
OPTIMIZER_STATES = {"adamw": 2, "adam": 2, "sgd": 0, "sgd-momentum": 1}
_LLAMA_LIKE = ("llama", "qwen2", "mistral")
#: Width-``i`` tensors an FFN activation keeps for backward (its input included), where that is not 1.
#: Counted with ``saved_tensors_hooks`` on ``transformers.activations.ACT2FN`` (transformers 5.24, torch
#: 2.13): fused kernels (``gelu``, ``gelu_pytorch_tanh``, ``relu``, ``silu``, ...) keep one tensor, while the
#: activations written as chains of Python-level ops keep several, e.g. GPT-2's ``gelu_new``
#: (``0.5 * x * (1 + tanh(c * (x + 0.044715 * x**3)))``) keeps x, the tanh output, ``0.5 * x`` and ``1 + tanh``.
FFN_ACTIVATION_SAVES: dict[str, float] = {
    "gelu_new": 4.0,
    "gelu_python_tanh": 4.0,
    "gelu_accurate": 4.0,
    "gelu_fast": 7.0,
    "gelu_python": 3.0,
    "gelu_10": 2.0,
    "quick_gelu": 2.0,
    "linear": 0.0,
}
#: Under CUDA fp16 autocast, in fp32 elements per width-``i`` element, for the activations that call
#: ``torch.pow`` (which autocast runs in fp32): the fp32 copy of x that pow keeps, the fp32 tanh output,
#: ``0.5 * x`` (fp16) and ``1 + tanh`` (fp32) = (4 + 4 + 2 + 4) / 4. Every other activation keeps its
#: :data:`FFN_ACTIVATION_SAVES` tensors in fp16 (``act_intermediate = 0.5`` each).
FFN_ACTIVATION_SAVES_FP16_AUTOCAST: dict[str, float] = {
    "gelu_new": 3.5,
    "gelu_python_tanh": 3.5,
    "gelu_accurate": 3.5,
}


#: The CUDA workspace constants: least squares on the measured peaks of the three MiniLM fit configs
#: (``benchmarks/results/memory-cuda``), as the CPU's were.
CUDA_WORKSPACE_LAYERS = 1.17
CUDA_WORKSPACE_BYTES = 2.1e6


@dataclass(frozen=True)
class Calibration:
    """Constants of the activation and workspace model (defaults derived in the module docstring).

    Units: ``act_*`` count saved tensors in elements of ``dtype_bytes``; ``mask_*`` count bytes. The defaults
    are those of the CPU, where the project was measured (``benchmarks/memory_calibration.py``): dropout masks
    there are fp32; :meth:`for_device` gives the CUDA variant with bool masks.
    """

    act_hidden: float = 5.0  # per b*s*h: Q, K, V and the two LayerNorm inputs of a layer
    act_intermediate: float = 1.0  # per b*s*i and tensor the FFN activation keeps (see FFN_ACTIVATION_SAVES)
    act_intermediate_gated: float = 3.0  # per b*s*i: gate, up and SiLU(gate) of a SwiGLU FFN
    act_attn: float = 2.0  # per b*a*s^2: softmax output and attention-dropout output (eager attention)
    act_norm_stats: float = 4.0  # per b*s: mean and rstd of the two LayerNorms
    mask_hidden: float = 8.0  # bytes per b*s*h: the two dropout masks after attention and FFN (fp32 on CPU)
    mask_attn: float = 4.0  # bytes per b*a*s^2: attention-probability dropout mask (fp32 on CPU)
    act_lora_input: float = 1.0  # per b*s*in of each adapted projection: its LoRA-dropout output
    mask_lora_input: float = 4.0  # bytes per b*s*in of each adapted projection: that dropout's mask (fp32)
    act_lora_rank: float = 1.0  # per b*s*r of each adapted projection: lora_A output kept for lora_B
    # Tensors alive at the peak besides the saved ones (the peak is the end of the forward pass; torch.profiler
    # finds ~28 MB more than the saved tensors at MiniLM 16x128, not itemised: the top layer's output and
    # temporaries) and what the allocator and libraries hold. Least squares on measured peaks of
    # three MiniLM configs (batch x seq 8x64, 16x128, 32x128, rank 8; benchmarks/memory_calibration.py), held
    # out: two heterogeneous-rank MiniLM configs, an 8-layer BERT and a GPT-2 (all within 3%).
    workspace_layers: float = 0.25  # in units of one layer's saved activations
    workspace_bytes: float = 8e6  # fixed: allocator slack, logits, library buffers (a CUDA context excluded)
    # Under gradient checkpointing the peak moves into the backward pass: one recomputed layer's saved tensors
    # plus its gradient temporaries (the s x s score gradients among them), in units of one layer's saved
    # activations. Fitted on minilm-b16-s128-r8-ckpt (benchmarks/results/memory-base-options); the CUDA value
    # is the CPU's until it is measured there.
    checkpoint_layers: float = 0.26
    # Per b*s*width of each distinct 8-bit linear input, in elements of dtype_bytes: what bitsandbytes' 8-bit
    # matmul keeps for backward (CPU: the fp32 input, measured; CUDA: taken as its fp16 copy, not measured).
    int8_saved_inputs: float = 1.0
    adapter_bytes: int = 4  # bytes per LoRA parameter, gradient and optimizer moment (PEFT keeps them fp32)
    weight_cast_bytes: float = 0.0  # per frozen linear weight a gradient flows through: autocast's fp16 copy
    fp16_autocast: bool = False  # FFN activations as FFN_ACTIVATION_SAVES_FP16_AUTOCAST counts them

    @classmethod
    def for_device(cls, device: str) -> Calibration:
        """The constants for ``"cpu"`` (fp32 training) or ``"cuda"`` (fp16 autocast, as ``train_local`` runs there).

        Both were measured (``benchmarks/memory_calibration.py``; ``--device cuda`` on an H200). On CUDA,
        in units of fp32 elements: Q, K, V and the attention output kept by SDPA's fused kernel are fp16
        (4 x 0.5) and the two LayerNorm inputs fp32 (2), so ``act_hidden`` is 4; the fused kernel keeps no
        ``s x s`` tensors and draws its dropout in the kernel (``act_attn = mask_attn = 0``); the FFN
        activation's input is fp16 (0.5); dropout keeps bool masks (1 byte); each adapted projection keeps
        the fp16 copy of its LoRA-dropout output that ``lora_A`` saves (0.5) with its bool mask, and an fp16
        ``lora_A`` output (0.5). Autocast also keeps an fp16 copy of every frozen linear weight that a
        gradient flows back through (2 bytes each). The workspace constants are the CUDA fit.
        """
        if device == "cpu":
            return cls()
        if device == "cuda":
            return cls(
                act_hidden=4.0,
                act_intermediate=0.5,
                act_intermediate_gated=1.5,
                act_attn=0.0,
                mask_hidden=2.0,
                mask_attn=0.0,
                act_lora_input=0.5,
                mask_lora_input=1.0,
                act_lora_rank=0.5,
                weight_cast_bytes=2.0,
                int8_saved_inputs=0.5,
                fp16_autocast=True,
                workspace_layers=CUDA_WORKSPACE_LAYERS,
                workspace_bytes=CUDA_WORKSPACE_BYTES,
            )
        raise ValueError(f"device {device!r} is invalid: expected 'cpu' or 'cuda'")


#: Bytes per weight of a k-bit linear layer (bitsandbytes, as ``quantization`` loads it), and per block of
#: ``blocksize`` weights for its fp32 scale: LLM.int8 keeps one int8 per weight and an fp32 scale per output
#: row (a block of ``in_features``); NF4 packs two weights per byte with an fp32 absmax per 64 weights
#: (``bnb_4bit_use_double_quant = false``). Biases, embeddings and norms stay in the base dtype.
QUANTIZED_WEIGHT_BYTES = {"8bit": (1.0, None), "4bit": (0.5, 64)}


@dataclass(frozen=True)
class TrainShape:
    """One training step: ``batch`` sequences of ``seq_len`` tokens, frozen weights and activations in
    ``dtype_bytes`` (4 = fp32).

    ``weight_bytes`` is the frozen base's bytes per parameter when it differs from the activations' (0: the
    same): a 16-bit base under CUDA's fp16 autocast, whose activations the CUDA calibration already counts
    in fp16. ``quantization`` (``none``, ``8bit``, ``4bit``) stores the layers' linear weights as
    bitsandbytes does; ``checkpointing`` (gradient checkpointing) keeps only each layer's input for
    backward and recomputes one layer at a time.
    """

    batch: int
    seq_len: int
    dtype_bytes: int = 4
    quantization: str = "none"
    checkpointing: bool = False
    weight_bytes: int = 0

    @property
    def base_bytes(self) -> int:
        """Bytes per frozen base parameter that is not quantized."""
        return self.weight_bytes or self.dtype_bytes

    def __post_init__(self) -> None:
        for name in ("batch", "seq_len", "dtype_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainShape.{name}={value!r} is invalid: expected a positive integer")
        if self.weight_bytes not in (0, 1, 2, 4, 8):
            raise ValueError(f"TrainShape.weight_bytes={self.weight_bytes!r} is invalid: expected 0, 1, 2, 4 or 8")
        if self.quantization != "none" and self.quantization not in QUANTIZED_WEIGHT_BYTES:
            raise ValueError(f"TrainShape.quantization={self.quantization!r} is invalid: expected none, 8bit or 4bit")


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a transformer that the memory model needs.

    Attributes
    ----------
    num_layers, hidden, intermediate, num_heads, vocab, max_positions : int
        As in a transformers config (``intermediate`` is the FFN width).
    lora_targets_per_layer : tuple of (in_features, out_features)
        Each projection of a layer that can carry LoRA, e.g. BERT query and value: ``((h, h), (h, h))``.
    target_names : tuple of str
        Their module names (``("query", "value")``); default ``target0``, ``target1``, ...
    num_kv_heads, head_dim : int or None
        Grouped-query attention (LLaMA); None means ``num_heads`` and ``hidden // num_heads``.
    type_vocab : int
        Token-type embedding rows (BERT 2, RoBERTa 1, others 0).
    pooler : bool
        Whether the backbone holds a dense pooler (``h*h + h``): ``AutoModel`` builds one for BERT/RoBERTa.
    learned_positions : bool
        Position embedding table (False for rotary embeddings).
    gated_ffn, attn_bias, mlp_bias, rms_norm : bool
        LLaMA-style blocks: SwiGLU FFN (3 matrices), bias-free projections, RMSNorm (weight only).
    ffn_activation : str
        The FFN activation as transformers names it (``hidden_act``, GPT-2's ``activation_function``,
        DistilBERT's ``activation``): how many width-``i`` tensors it keeps (:data:`FFN_ACTIVATION_SAVES`).
    dropout : bool
        Whether the blocks drop out (BERT, GPT-2). LLaMA-style blocks have no hidden dropout and, at
        ``attention_dropout = 0``, SDPA runs its fused kernel: no masks and no ``s x s`` tensors are kept
        (measured on Qwen2.5-0.5B's shape, ``benchmarks/results/memory-base-options``).
    """

    num_layers: int
    hidden: int
    intermediate: int
    num_heads: int
    vocab: int
    max_positions: int
    lora_targets_per_layer: tuple[Target, ...]
    target_names: tuple[str, ...] = ()
    num_kv_heads: int | None = None
    head_dim: int | None = None
    type_vocab: int = 0
    pooler: bool = False
    learned_positions: bool = True
    gated_ffn: bool = False
    attn_bias: bool = True
    mlp_bias: bool = True
    rms_norm: bool = False
    ffn_activation: str = "gelu"
    dropout: bool = True

    def __post_init__(self) -> None:
        for name in ("num_layers", "hidden", "intermediate", "num_heads", "vocab", "max_positions"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelShape.{name}={value!r} is invalid: expected a positive integer")
        targets = tuple((int(i), int(o)) for i, o in self.lora_targets_per_layer)
        if not targets or any(i < 1 or o < 1 for i, o in targets):
            raise ValueError(f"lora_targets_per_layer={targets!r} is invalid: expected (in, out) pairs of sizes >= 1")
        names = tuple(self.target_names) or tuple(f"target{j}" for j in range(len(targets)))
        if len(names) != len(targets) or len(set(names)) != len(names):
            raise ValueError(f"target_names={names!r} must name each of the {len(targets)} targets once")
        # Frozen dataclass: normalise lists to tuples once, here.
        object.__setattr__(self, "lora_targets_per_layer", targets)
        object.__setattr__(self, "target_names", names)

    @property
    def q_dim(self) -> int:
        """Width of the query projection (``num_heads * head_dim``)."""
        return self.num_heads * (self.head_dim or self.hidden // self.num_heads)

    @property
    def kv_dim(self) -> int:
        """Width of the key and value projections (smaller than ``q_dim`` with grouped-query attention)."""
        return (self.num_kv_heads or self.num_heads) * (self.head_dim or self.hidden // self.num_heads)

    @classmethod
    def from_hf_config(cls, config: Mapping[str, object], targets: Sequence[str | Target]) -> ModelShape:
        """Read a transformers config given as a dict (``config.to_dict()`` or a parsed config.json).

        Parameters
        ----------
        config : mapping
            Keys of any supported family: hidden_size/dim/n_embd, num_hidden_layers/n_layers/n_layer,
            intermediate_size/hidden_dim/n_inner (None means 4*hidden), num_attention_heads/n_heads/n_head,
            vocab_size, max_position_embeddings/n_positions. ``model_type`` and ``rms_norm_eps`` select
            the BERT-, GPT-2- or LLaMA-style block; ``bert`` and ``roberta`` get the pooler that
            ``AutoModel`` builds. Exact against transformers for BERT, RoBERTa, DistilBERT, GPT-2 and
            LLaMA; Qwen2 is over-counted by its missing o_proj bias (h per layer, 4e-5 of Qwen2.5-0.5B).
        targets : sequence of str or (in, out)
            LoRA target module names (``query``, ``q_lin``, ``c_attn``, ``q_proj``, ...; a dotted suffix
            such as ``attention.self.query`` works) or explicit ``(in_features, out_features)`` pairs.

        Returns
        -------
        ModelShape
        """
        family = str(config.get("model_type") or "").lower()
        llama_like = family in _LLAMA_LIKE or "rms_norm_eps" in config
        hidden = _key(config, "hidden_size", "dim", "n_embd")
        heads = _key(config, "num_attention_heads", "n_heads", "n_head")
        shape = {
            "num_layers": _key(config, "num_hidden_layers", "n_layers", "n_layer"),
            "hidden": hidden,
            "intermediate": _key(config, "intermediate_size", "hidden_dim", "n_inner", default=4 * hidden),
            "num_heads": heads,
            "vocab": _key(config, "vocab_size"),
            "max_positions": _key(config, "max_position_embeddings", "n_positions"),
            "num_kv_heads": config.get("num_key_value_heads") or None,
            "head_dim": config.get("head_dim") or None,
            "type_vocab": int(config.get("type_vocab_size") or 0),
            "pooler": family in ("bert", "roberta"),
            "learned_positions": not llama_like,
            "gated_ffn": llama_like,
            "attn_bias": bool(config.get("attention_bias", family == "qwen2")) if llama_like else True,
            "mlp_bias": bool(config.get("mlp_bias", False)) if llama_like else True,
            "rms_norm": llama_like,
            "ffn_activation": str(
                config.get("hidden_act") or config.get("activation_function") or config.get("activation") or "gelu"
            ),
            "dropout": not llama_like or float(config.get("attention_dropout") or 0.0) > 0,
        }
        names = tuple(t if isinstance(t, str) else f"target{j}" for j, t in enumerate(targets))
        probe = cls(**shape, lora_targets_per_layer=((1, 1),))  # only to size the named targets
        pairs = tuple(_target_shape(probe, t) for t in targets)
        return cls(**shape, lora_targets_per_layer=pairs, target_names=names)

    def linear_weight_bytes_per_layer(self, train: TrainShape) -> float:
        """Bytes of a layer's linear weights as ``train`` stores them (quantized or in its dtype)."""
        if train.quantization == "none":
            return float(self.linear_weights_per_layer() * train.base_bytes)
        per_weight, block = QUANTIZED_WEIGHT_BYTES[train.quantization]
        total = 0.0
        for fan_in, fan_out in self.linear_shapes_per_layer():
            scales = fan_out if block is None else -(-fan_in * fan_out // block)  # one fp32 scale per row/block
            total += fan_in * fan_out * per_weight + 4 * scales
        return total

    def linear_shapes_per_layer(self) -> list[tuple[int, int]]:
        """``(in, out)`` of a layer's linear projections: Q, K, V, O and the FFN's two (three when gated)."""
        h, i, q, kv = self.hidden, self.intermediate, self.q_dim, self.kv_dim
        ffn = [(h, i), (h, i), (i, h)] if self.gated_ffn else [(h, i), (i, h)]
        return [(h, q), (h, kv), (h, kv), (q, h), *ffn]

    def linear_weights_per_layer(self) -> int:
        """Weight elements of a layer's linear projections (attention and FFN, biases excluded)."""
        return sum(fan_in * fan_out for fan_in, fan_out in self.linear_shapes_per_layer())

    def frozen_param_count(self) -> int:
        """Parameters of the backbone (no task head): embeddings, layers, norms, pooler.

        BERT per layer: attention ``4h^2 + 4h``, FFN ``2hi + i + h``, two LayerNorms ``2 * 2h``.

        Returns
        -------
        int
        """
        h, i = self.hidden, self.intermediate
        embed = self.vocab * h + self.type_vocab * h + (self.max_positions * h if self.learned_positions else 0)
        attn = 2 * h * self.q_dim + 2 * h * self.kv_dim + (self.q_dim + 2 * self.kv_dim + h) * self.attn_bias
        ffn = (3 if self.gated_ffn else 2) * h * i + ((2 * i if self.gated_ffn else i) + h) * self.mlp_bias
        # Two norms per layer plus one outside (embedding LayerNorm in BERT, final norm in GPT-2/LLaMA).
        norms = (2 * self.num_layers + 1) * (h if self.rms_norm else 2 * h)
        pooler = h * h + h if self.pooler else 0
        return embed + self.num_layers * (attn + ffn) + norms + pooler


def predict_peak_bytes(
    model: ModelShape,
    train: TrainShape,
    ranks_per_layer: RankSpec,
    optimizer: str = "adamw",
    calibration: Calibration | None = None,
    frozen_rank: int = 0,
) -> dict[str, int]:
    """Predicted peak memory of one LoRA training step, by component.

    With ``frozen_rank`` > 0 every target of rank 0 holds a frozen adapter of that rank (``frozen-layers =
    use``): its parameters count, but no gradient or optimizer state. Below the first trained layer no
    gradient flows, so it keeps nothing for backward; above it, its LoRA-dropout mask (the frozen
    ``lora_A`` and ``lora_B`` need only their weights to pass the gradient on).

    Parameters
    ----------
    model : ModelShape
        Sizes of the transformer.
    train : TrainShape
        Batch, sequence length and dtype of the step.
    ranks_per_layer : sequence, one entry per layer
        An int (the same rank for every target of the layer), a sequence of ints (one per target) or a
        mapping target name -> rank (missing targets get 0). Rank 0 means no adapter.
    optimizer : str
        ``adamw``, ``adam``, ``sgd`` or ``sgd-momentum``.
    calibration : Calibration, optional
        Activation and workspace constants; defaults to ``Calibration()``.
    frozen_rank : int
        Rank of the frozen adapter each untrained target holds (0: none).

    Returns
    -------
    dict[str, int]
        Bytes of frozen_weights, lora_params (frozen adapters included), lora_grads, optimizer_state,
        activations, weight_casts (autocast's fp16 weight copies; 0 on the CPU), workspace, and total.
    """
    cal = calibration or Calibration()
    if optimizer not in OPTIMIZER_STATES:
        raise ValueError(f"unknown optimizer {optimizer!r}: expected one of {', '.join(OPTIMIZER_STATES)}")
    if model.learned_positions and train.seq_len > model.max_positions:
        raise ValueError(f"seq_len {train.seq_len} exceeds the model's max_positions {model.max_positions}")
    ranks = _per_target_ranks(model, ranks_per_layer)
    lora = _lora_param_count(model, ranks)
    adapted = [layer_index for layer_index, layer in enumerate(ranks) if any(layer)]
    first = adapted[0] if adapted else model.num_layers
    stored_layers = model.num_layers - first
    per_layer = layer_activation_bytes(model, train, cal)
    frozen = frozen_rank * sum(
        i + o for layer in ranks for r, (i, o) in zip(layer, model.lora_targets_per_layer, strict=True) if not r
    )
    # What each layer from the first adapted one up keeps for its adapters (below it there are none): the
    # trained ones' activations, and the frozen ones' dropout masks.
    layer_lora = [
        sum(
            lora_activation_bytes(train, cal, i, r)
            if r
            else frozen_lora_activation_bytes(train, cal, i) * bool(frozen_rank)
            for r, (i, _) in zip(layer, model.lora_targets_per_layer, strict=True)
        )
        for layer in ranks[first:]
    ]
    if train.checkpointing:
        # Kept for backward: each layer's input from the first adapted layer up; then one layer at a time is
        # recomputed with everything it saves (its adapters' activations too), the largest one at the peak.
        inputs = stored_layers * train.batch * train.seq_len * model.hidden * train.dtype_bytes
        recomputed = per_layer + kbit_input_bytes(model, train, cal) + max(layer_lora) if layer_lora else 0
        activations = inputs + recomputed
    else:
        activations = stored_layers * (per_layer + kbit_input_bytes(model, train, cal)) + sum(layer_lora)
    parts = {
        "frozen_weights": _frozen_weight_bytes(model, train),
        "lora_params": (lora + frozen) * cal.adapter_bytes,
        "lora_grads": lora * cal.adapter_bytes,
        "optimizer_state": OPTIMIZER_STATES[optimizer] * lora * cal.adapter_bytes,
        "activations": activations,
        # Rounded per layer, as _Costs adds it, so the two stay equal to the byte. A k-bit or 16-bit base
        # needs no fp16 copy (k-bit weights are dequantized a matrix at a time, inside the matmul).
        "weight_casts": stored_layers * round(model.linear_weights_per_layer() * weight_cast_bytes(train, cal)),
        "workspace": round(
            cal.workspace_bytes + (cal.workspace_layers + cal.checkpoint_layers * train.checkpointing) * per_layer
        ),
    }
    parts["total"] = sum(parts.values())
    return parts


def predict_forward_bytes(
    model: ModelShape, train: TrainShape, ranks_per_layer: RankSpec, calibration: Calibration | None = None
) -> dict[str, int]:
    """Predicted peak memory of a forward pass without gradients (evaluation), by component.

    Nothing is kept for backward, so at any moment one layer's tensors are alive: priced as the tensors a
    training step keeps per layer (:func:`layer_activation_bytes`, dropout masks included), an upper bound
    in eval mode, plus the workspace of a training step. The base and every adapter the client holds count.
    """
    cal = calibration or Calibration()
    ranks = _per_target_ranks(model, ranks_per_layer)
    lora = _lora_param_count(model, ranks)
    per_layer = layer_activation_bytes(model, train, cal)
    parts = {
        "frozen_weights": _frozen_weight_bytes(model, train),
        "lora_params": lora * cal.adapter_bytes,
        "activations": per_layer,
        "workspace": round(cal.workspace_bytes + cal.workspace_layers * per_layer),
    }
    parts["total"] = sum(parts.values())
    return parts


def largest_fitting_batch(price: Callable[[int], int], budget: int, batch: int) -> int:
    """The largest of ``batch``, ``batch // 2``, ... 1 whose ``price`` fits ``budget`` (0: no budget).

    1 when none fits: the caller decides whether that is an error (a training plan) or the least it can do.
    """
    while batch > 1 and budget and price(batch) > budget:
        batch //= 2
    return batch


def _lora_param_count(model: ModelShape, ranks: Sequence[tuple[int, ...]]) -> int:
    """LoRA parameters of per-target ranks (:func:`_per_target_ranks`): ``r * (in + out)`` per adapted target."""
    return sum(r * (i + o) for layer in ranks for r, (i, o) in zip(layer, model.lora_targets_per_layer, strict=True))


def _frozen_weight_bytes(model: ModelShape, train: TrainShape) -> int:
    linear = model.num_layers * model.linear_weights_per_layer()
    return round(
        (model.frozen_param_count() - linear) * train.base_bytes
        + model.num_layers * model.linear_weight_bytes_per_layer(train)
    )


def kbit_input_bytes(model: ModelShape, train: TrainShape, cal: Calibration) -> int:
    """Bytes a layer's 8-bit linear layers keep for backward: bitsandbytes' ``MatMul8bitFp`` (its CPU training
    path, 0.50) holds every input, frozen weight or not; Q, K and V share one, as do a gated FFN's gate and up.
    """
    if train.quantization != "8bit":
        return 0
    widths = model.hidden + model.q_dim + model.hidden + model.intermediate  # QKV, O, FFN in, FFN out
    return round(train.batch * train.seq_len * widths * train.dtype_bytes * cal.int8_saved_inputs)


def weight_cast_bytes(train: TrainShape, cal: Calibration) -> float:
    """Bytes per frozen linear weight of autocast's fp16 copy: only an fp32, unquantized base needs one."""
    return cal.weight_cast_bytes if train.quantization == "none" and train.base_bytes == 4 else 0.0


def layer_activation_bytes(model: ModelShape, train: TrainShape, cal: Calibration) -> int:
    """Bytes one layer keeps for backward when a gradient has to flow through it (adapters excluded)."""
    b, s, d = train.batch, train.seq_len, train.dtype_bytes
    tokens, scores = b * s, b * model.num_heads * s * s
    if model.gated_ffn:
        inter = cal.act_intermediate_gated
    elif cal.fp16_autocast and model.ffn_activation in FFN_ACTIVATION_SAVES_FP16_AUTOCAST:
        inter = FFN_ACTIVATION_SAVES_FP16_AUTOCAST[model.ffn_activation]
    else:
        inter = cal.act_intermediate * FFN_ACTIVATION_SAVES.get(model.ffn_activation, 1.0)
    if not model.dropout:  # nothing to mask, and SDPA's fused kernel keeps no s x s tensor
        scores = 0
    elements = cal.act_hidden * tokens * model.hidden + inter * tokens * model.intermediate + cal.act_attn * scores
    masks = (cal.mask_hidden * tokens * model.hidden if model.dropout else 0) + cal.mask_attn * scores
    return round(d * (elements + cal.act_norm_stats * tokens) + masks)


def lora_activation_bytes(train: TrainShape, cal: Calibration, in_features: int, rank: int) -> int:
    """Bytes one adapted projection keeps for backward: its LoRA-dropout input and the lora_A output."""
    tokens, d = train.batch * train.seq_len, train.dtype_bytes
    return round(tokens * (in_features * (d * cal.act_lora_input + cal.mask_lora_input) + d * cal.act_lora_rank * rank))


def frozen_lora_activation_bytes(train: TrainShape, cal: Calibration, in_features: int) -> int:
    """Bytes a frozen adapter keeps when a gradient flows through it: its LoRA-dropout mask only."""
    return round(train.batch * train.seq_len * in_features * cal.mask_lora_input)


def _per_target_ranks(model: ModelShape, ranks_per_layer: RankSpec) -> list[tuple[int, ...]]:
    if len(ranks_per_layer) != model.num_layers:
        raise ValueError(
            f"ranks_per_layer has {len(ranks_per_layer)} entries: expected one per layer ({model.num_layers})"
        )
    names, targets = model.target_names, model.lora_targets_per_layer
    out = []
    for layer, spec in enumerate(ranks_per_layer):
        if isinstance(spec, Mapping):
            unknown = set(spec) - set(names)
            if unknown:
                raise ValueError(f"layer {layer} names unknown targets {sorted(unknown)}: expected {list(names)}")
            ranks = tuple(int(spec.get(name, 0)) for name in names)
        elif isinstance(spec, Sequence):
            if len(spec) != len(targets):
                raise ValueError(f"layer {layer} has {len(spec)} ranks: expected one per target ({len(targets)})")
            ranks = tuple(int(r) for r in spec)
        else:
            ranks = (int(spec),) * len(targets)
        for r, name, (i, o) in zip(ranks, names, targets, strict=True):
            if not 0 <= r <= min(i, o):
                raise ValueError(f"rank {r} of target {name!r} in layer {layer} is invalid: expected 0..{min(i, o)}")
        out.append(ranks)
    return out


def _target_shape(model: ModelShape, target: str | Target) -> Target:
    if not isinstance(target, str):
        i, o = target
        return int(i), int(o)
    h, i, q, kv = model.hidden, model.intermediate, model.q_dim, model.kv_dim
    shapes = {
        **dict.fromkeys(("query", "q_lin", "q_proj"), (h, q)),
        **dict.fromkeys(("key", "value", "k_lin", "v_lin", "k_proj", "v_proj"), (h, kv)),
        **dict.fromkeys(("out_lin", "o_proj"), (q, h)),
        **dict.fromkeys(("lin1", "c_fc", "gate_proj", "up_proj"), (h, i)),
        **dict.fromkeys(("lin2", "down_proj"), (i, h)),
        "c_attn": (h, q + 2 * kv),
    }
    name = target.rsplit(".", 1)[-1]
    if name not in shapes:
        raise ValueError(f"unknown LoRA target {target!r}: expected one of {', '.join(shapes)} or an (in, out) pair")
    return shapes[name]


def _key(config: Mapping[str, object], *keys: str, default: int | None = None) -> int:
    for key in keys:
        if config.get(key) is not None:
            return int(config[key])
    if default is None:
        raise ValueError(f"config has none of the keys {', '.join(keys)}: cannot size the model")
    return default
