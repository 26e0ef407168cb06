"""Peak-memory model of a LoRA step and the per-layer rank allocation under a budget (pure, fast)."""

from __future__ import annotations

import json
import random
import re
from dataclasses import fields

import pytest

from atlas_flwr.common.devices import DeviceProfile, format_size, parse_size, profile_for
from strategies.memory import (
    Calibration,
    ModelShape,
    TrainShape,
    largest_fitting_batch,
    predict_forward_bytes,
    predict_peak_bytes,
)
from strategies.ranks import _Costs, allocate_ranks

# Config dicts as in each model's config.json (keys that do not size the model trimmed).
MINILM = {
    "architectures": ["BertModel"],
    "hidden_size": 384,
    "intermediate_size": 1536,
    "max_position_embeddings": 512,
    "model_type": "bert",
    "num_attention_heads": 12,
    "num_hidden_layers": 6,
    "type_vocab_size": 2,
    "vocab_size": 30522,
}
DISTILBERT = {
    "dim": 768,
    "hidden_dim": 3072,
    "max_position_embeddings": 512,
    "model_type": "distilbert",
    "n_heads": 12,
    "n_layers": 6,
    "vocab_size": 30522,
}
GPT2 = {
    "model_type": "gpt2",
    "n_ctx": 1024,
    "n_embd": 768,
    "n_head": 12,
    "n_layer": 12,
    "n_positions": 1024,
    "vocab_size": 50257,
}
LLAMA_3_2_1B = {
    "attention_bias": False,
    "head_dim": 64,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 16,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05,
    "rope_theta": 500000.0,
    "tie_word_embeddings": True,
    "vocab_size": 128256,
}
MB = 10**6


@pytest.fixture()
def minilm() -> ModelShape:
    return ModelShape.from_hf_config(MINILM, ["query", "value"])


def _tiny(layers: int = 4) -> ModelShape:
    return ModelShape(
        num_layers=layers,
        hidden=64,
        intermediate=256,
        num_heads=4,
        vocab=100,
        max_positions=64,
        lora_targets_per_layer=[(64, 64), (64, 64)],
        target_names=("query", "value"),
    )


def test_from_hf_config_bert_minilm(minilm: ModelShape) -> None:
    assert (minilm.num_layers, minilm.hidden, minilm.intermediate, minilm.num_heads) == (6, 384, 1536, 12)
    assert (minilm.vocab, minilm.max_positions, minilm.type_vocab, minilm.pooler) == (30522, 512, 2, True)
    assert minilm.lora_targets_per_layer == ((384, 384), (384, 384))
    assert minilm.target_names == ("query", "value")
    # BertModel of all-MiniLM-L6-v2, pooler included (AutoModel builds it), counted with transformers.
    assert minilm.frozen_param_count() == 22_713_216
    assert predict_peak_bytes(minilm, TrainShape(1, 8), [0] * 6)["frozen_weights"] == 4 * 22_713_216


@pytest.mark.parametrize(
    ("config", "targets", "layers", "hidden", "intermediate", "heads", "pairs", "params"),
    [
        (DISTILBERT, ["q_lin", "v_lin"], 6, 768, 3072, 12, ((768, 768), (768, 768)), 66_362_880),
        (GPT2, ["c_attn"], 12, 768, 3072, 12, ((768, 2304),), 124_439_808),
        (GPT2 | {"n_inner": None}, ["c_attn"], 12, 768, 3072, 12, ((768, 2304),), 124_439_808),
        (LLAMA_3_2_1B, ["q_proj", "v_proj"], 16, 2048, 8192, 32, ((2048, 2048), (2048, 512)), 1_235_814_400),
    ],
)
def test_from_hf_config_other_families(
    config: dict, targets: list, layers: int, hidden: int, intermediate: int, heads: int, pairs: tuple, params: int
) -> None:
    shape = ModelShape.from_hf_config(config, targets)
    assert (shape.num_layers, shape.hidden, shape.intermediate, shape.num_heads) == (
        layers,
        hidden,
        intermediate,
        heads,
    )
    assert shape.lora_targets_per_layer == pairs
    # Backbone parameter counts of DistilBertModel, GPT2Model and LlamaModel (Llama-3.2-1B, tied head).
    assert shape.frozen_param_count() == params


def test_from_hf_config_targets_by_suffix_or_shape() -> None:
    shape = ModelShape.from_hf_config(MINILM, ["attention.self.query", (384, 1536)])
    assert shape.lora_targets_per_layer == ((384, 384), (384, 1536))
    assert shape.target_names == ("attention.self.query", "target1")
    with pytest.raises(ValueError, match="unknown LoRA target 'dense'"):
        ModelShape.from_hf_config(MINILM, ["dense"])
    with pytest.raises(ValueError, match="none of the keys hidden_size, dim, n_embd"):
        ModelShape.from_hf_config({"num_hidden_layers": 2}, ["query"])


def test_breakdown_components(minilm: ModelShape) -> None:
    parts = predict_peak_bytes(minilm, TrainShape(16, 128), [8] * 6)
    lora = 6 * 2 * 8 * (384 + 384)
    assert parts["lora_params"] == parts["lora_grads"] == 4 * lora
    assert parts["optimizer_state"] == 2 * 4 * lora
    assert parts["total"] == sum(v for k, v in parts.items() if k != "total")
    sgd = predict_peak_bytes(minilm, TrainShape(16, 128), [8] * 6, optimizer="sgd")
    assert sgd["optimizer_state"] == 0


def test_frozen_layers_below_the_first_adapter_store_nothing(minilm: ModelShape) -> None:
    train = TrainShape(16, 128)
    top = predict_peak_bytes(minilm, train, [0, 0, 0, 0, 0, 8])["activations"]
    # Adapting layer 0 only: every layer above it still keeps activations for the backward pass.
    bottom = predict_peak_bytes(minilm, train, [8, 0, 0, 0, 0, 0])["activations"]
    assert bottom > 5 * top
    assert predict_peak_bytes(minilm, train, [0] * 6)["activations"] == 0


def test_rank_specs_are_equivalent(minilm: ModelShape) -> None:
    train = TrainShape(4, 64)
    as_int = predict_peak_bytes(minilm, train, [0, 4, 4, 4, 4, 4])
    as_list = predict_peak_bytes(minilm, train, [(0, 0)] + [(4, 4)] * 5)
    as_dict = predict_peak_bytes(minilm, train, [{}] + [{"query": 4, "value": 4}] * 5)
    assert as_int == as_list == as_dict


def test_linear_in_batch_and_rank(minilm: ModelShape) -> None:
    def total(batch: int, rank: int) -> int:
        return predict_peak_bytes(minilm, TrainShape(batch, 128), [rank] * 6)["total"]

    steps = [total(b, 8) for b in (1, 2, 3, 4)]
    assert len({steps[i + 1] - steps[i] for i in range(3)}) == 1 and steps[1] > steps[0]
    ranks = [total(8, r) for r in (2, 4, 6, 8)]
    assert len({ranks[i + 1] - ranks[i] for i in range(3)}) == 1 and ranks[1] > ranks[0]


def test_quadratic_in_seq_through_attention(minilm: ModelShape) -> None:
    def second_difference(cal: Calibration) -> int:
        t = [predict_peak_bytes(minilm, TrainShape(4, s), [8] * 6, calibration=cal)["total"] for s in (64, 128, 192)]
        return t[2] - 2 * t[1] + t[0]

    quadratic = second_difference(Calibration())
    # The s^2 term is b * heads * s^2 * (dtype * act_attn + mask_attn) per storing layer (+0.25 workspace).
    assert abs(quadratic - 6.25 * 4 * 12 * 2 * 64**2 * (4 * 2 + 4)) <= 2
    # CUDA's fused attention (SDPA) keeps no s x s tensor and draws its dropout inside the kernel.
    assert abs(second_difference(Calibration.for_device("cuda"))) <= 2
    assert abs(second_difference(Calibration(act_attn=0.0, mask_attn=0.0))) <= 2  # linear without it


def test_allocation_respects_budget_and_is_monotone(minilm: ModelShape) -> None:
    train = TrainShape(16, 128)
    for seed in range(3):
        rng = random.Random(seed)
        importance = [rng.choice([0.0, 0.5, 1.0, 3.0]) * rng.random() for _ in range(6)]
        previous = -1.0
        for budget in range(150 * MB, 600 * MB, 10 * MB):
            alloc = allocate_ranks(minilm, train, budget, importance)
            assert alloc.predicted == predict_peak_bytes(minilm, train, alloc.ranks)
            assert alloc.predicted["total"] <= budget == alloc.budget_bytes
            assert alloc.objective >= previous
            previous = alloc.objective


def test_more_important_layers_get_higher_ranks(minilm: ModelShape) -> None:
    # Realistic costs: importance growing with depth agrees with deeper layers being cheaper.
    for budget in range(150 * MB, 600 * MB, 25 * MB):
        ranks = allocate_ranks(minilm, TrainShape(16, 128), budget, [1, 2, 3, 4, 5, 6]).ranks
        assert ranks == sorted(ranks)
    # Without activations every layer costs the same per rank: ranks follow importance exactly.
    flat = Calibration(**{f.name: 0.0 for f in fields(Calibration) if f.name.startswith(("act_", "mask_"))})
    model, train = _tiny(), TrainShape(1, 4)
    floor = predict_peak_bytes(model, train, [0] * 4, calibration=flat)["total"]
    for importance in ([1, 2, 3, 4], [4, 1, 3, 2], [2, 4, 1, 3]):
        for extra in range(0, 600_000, 20_000):
            ranks = allocate_ranks(model, train, floor + extra, importance, calibration=flat).ranks
            for i in range(4):
                for j in range(4):
                    assert importance[i] < importance[j] or ranks[i] >= ranks[j], (importance, extra, ranks)


def test_a_very_important_shallow_layer_is_worth_its_activations(minilm: ModelShape) -> None:
    alloc = allocate_ranks(minilm, TrainShape(16, 128), 600 * MB, [100, 0, 0, 0, 0, 0])
    assert alloc.ranks == [32, 0, 0, 0, 0, 0]


def test_binding(minilm: ModelShape) -> None:
    train = TrainShape(16, 128)
    tight = allocate_ranks(minilm, train, 250 * MB, [1] * 6)
    assert tight.binding and 0 < sum(tight.ranks) < 6 * 32
    huge = allocate_ranks(minilm, train, "1TB", [1] * 6)
    assert not huge.binding and huge.ranks == [32] * 6
    capped = allocate_ranks(minilm, train, "1TB", [1] * 6, max_rank=8)
    assert not capped.binding and capped.ranks == [8] * 6
    unused = allocate_ranks(minilm, train, "1TB", [0, 0, 1, 1, 1, 1])
    assert unused.ranks == [0, 0, 32, 32, 32, 32] and not unused.binding


@pytest.mark.parametrize(
    ("device", "frozen_rank", "quantization"),
    [
        ("cpu", 0, "none"),
        ("cpu", 8, "none"),
        ("cpu", 8, "8bit"),
        ("cuda", 0, "none"),
        ("cuda", 8, "none"),
        ("cuda", 8, "4bit"),
    ],
)
def test_candidate_ranks_and_costs_agree_with_predict(
    minilm: ModelShape, device: str, frozen_rank: int, quantization: str
) -> None:
    alloc = allocate_ranks(minilm, TrainShape(16, 128), "1TB", [1] * 6, candidate_ranks=(3, 12))
    assert alloc.ranks == [12] * 6
    ladder = [0, 1, 2, 4, 8, 16, 32]
    cal = Calibration.for_device(device)
    train = TrainShape(16, 128, quantization=quantization)
    costs = _Costs(minilm, train, cal, "adamw", ladder, frozen_rank)
    rng = random.Random(0)
    for _ in range(50):
        ranks = [rng.choice(ladder) for _ in range(6)]
        total = predict_peak_bytes(minilm, train, ranks, calibration=cal, frozen_rank=frozen_rank)["total"]
        assert costs.total(ranks) == total
        # The greedy's O(1) step cost is the difference of totals.
        layer, rank = rng.randrange(6), rng.choice(ladder)
        first = next((i for i, r in enumerate(ranks) if r), 6)
        raised = ranks[:layer] + [rank] + ranks[layer + 1 :]
        if rank > ranks[layer]:
            assert costs.delta(ranks, first, layer, rank) == costs.total(raised) - costs.total(ranks)


def test_frozen_adapters_cost_parameters_and_masks_above_the_first_trained_layer(minilm: ModelShape) -> None:
    train, ranks = TrainShape(16, 64), [0, 0, 0, 0, 8, 8]
    plain = predict_peak_bytes(minilm, train, ranks)
    held = predict_peak_bytes(minilm, train, ranks, frozen_rank=8)
    per_layer_params = 2 * 8 * (384 + 384)  # query and value, rank 8
    assert held["lora_params"] - plain["lora_params"] == 4 * per_layer_params * 4
    assert held["lora_grads"] == plain["lora_grads"] and held["optimizer_state"] == plain["optimizer_state"]
    assert held["activations"] == plain["activations"]  # the frozen layers are all below the trained ones
    gap = predict_peak_bytes(minilm, train, [0, 8, 0, 0, 8, 8], frozen_rank=8)
    no_gap = predict_peak_bytes(minilm, train, [0, 8, 0, 0, 8, 8])
    assert gap["activations"] - no_gap["activations"] == 2 * 2 * 16 * 64 * 384 * 4  # two frozen layers above


def test_cuda_autocast_keeps_weight_copies_from_the_first_adapted_layer_up(minilm: ModelShape) -> None:
    cuda, train = Calibration.for_device("cuda"), TrainShape(16, 128)
    per_layer = 2 * (4 * 384 * 384 + 2 * 384 * 1536)  # fp16 Q, K, V, output, FFN up and down weights
    assert predict_peak_bytes(minilm, train, [0, 0, 8, 8, 8, 8], calibration=cuda)["weight_casts"] == 4 * per_layer
    assert predict_peak_bytes(minilm, train, [8] * 6, calibration=cuda)["weight_casts"] == 6 * per_layer
    assert predict_peak_bytes(minilm, train, [8] * 6)["weight_casts"] == 0  # fp32 on the CPU: no copies


def test_a_forward_without_gradients_costs_the_held_weights_and_one_layer(minilm: ModelShape) -> None:
    step = TrainShape(batch=16, seq_len=128)
    forward = predict_forward_bytes(minilm, step, [8] * minilm.num_layers)
    train = predict_peak_bytes(minilm, step, [8] * minilm.num_layers)
    # The same base and adapters, no gradient or optimizer state, and one layer's tensors instead of six.
    assert forward["frozen_weights"] == train["frozen_weights"] and forward["lora_params"] == train["lora_params"]
    assert forward["activations"] * minilm.num_layers < train["activations"]
    assert forward["total"] < train["total"]
    held_none = predict_forward_bytes(minilm, step, [0] * minilm.num_layers)
    assert held_none["lora_params"] == 0 and held_none["activations"] == forward["activations"]


def test_largest_fitting_batch_halves_until_the_price_fits() -> None:
    price = lambda batch: 100 + 10 * batch
    assert largest_fitting_batch(price, 0, 64) == 64  # no budget
    assert largest_fitting_batch(price, 100 + 10 * 64, 64) == 64
    assert largest_fitting_batch(price, 100 + 10 * 63, 64) == 32
    assert largest_fitting_batch(price, 100 + 10 * 3, 64) == 2
    assert largest_fitting_batch(price, 50, 64) == 1  # nothing fits: the least it can do


def test_rank_pattern_for_peft() -> None:
    model = _tiny()
    alloc = allocate_ranks(model, TrainShape(1, 4), "1TB", [0, 1, 2, 3])
    names = [[f"layer.{i}.attention.self.{t}" for t in ("query", "value")] for i in range(4)]
    pattern = alloc.rank_pattern(names)
    assert alloc.ranks == [0, 32, 32, 32]
    assert alloc.excluded_layers == [0] and alloc.layers_to_transform == [1, 2, 3]
    assert pattern == {name: 32 for layer in names[1:] for name in layer}
    # PEFT's matching rule (peft.utils.other.get_pattern_key): a key matches a dotted suffix of the name.
    full = "base_model.model.encoder.layer.1.attention.self.query"
    assert [k for k in pattern if re.match(rf"(.*\.)?({k})$", full)] == ["layer.1.attention.self.query"]
    assert not any(re.match(rf"(.*\.)?({k})$", "encoder.layer.11.attention.self.query") for k in pattern)
    data = json.loads(json.dumps(alloc.to_dict()))
    assert data["excluded_layers"] == [0] and data["ranks"] == [0, 32, 32, 32]
    with pytest.raises(ValueError, match="module names for 3 layers: expected 4"):
        alloc.rank_pattern(names[:3])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"budget_bytes": 110 * MB}, "budget 110 MB is below the 117 MB needed with no LoRA at all"),
        ({"importance": [1.0] * 5}, r"importance has 5 values: expected one per layer \(6\)"),
        ({"importance": [1, 1, -1, 1, 1, 1]}, "importance -1.0 is invalid: expected finite values >= 0"),
        ({"importance": [1, 1, float("nan"), 1, 1, 1]}, "importance nan is invalid"),
        ({"max_rank": 512}, r"max_rank 512 is invalid: expected 0 <= max_rank <= min\(in, out\) = 384"),
        ({"candidate_ranks": (0, -4)}, "candidate_ranks .* expected integers >= 0"),
        ({"optimizer": "lion"}, "unknown optimizer 'lion'"),
    ],
)
def test_allocation_errors(minilm: ModelShape, kwargs: dict, match: str) -> None:
    args = {"budget_bytes": "1GB", "importance": [1.0] * 6} | kwargs
    with pytest.raises(ValueError, match=match):
        allocate_ranks(minilm, TrainShape(16, 128), **args)


def test_prediction_errors(minilm: ModelShape) -> None:
    train = TrainShape(2, 16)
    with pytest.raises(ValueError, match="rank 400 of target 'query' in layer 0 is invalid: expected 0..384"):
        predict_peak_bytes(minilm, train, [400] + [0] * 5)
    with pytest.raises(ValueError, match=r"ranks_per_layer has 2 entries: expected one per layer \(6\)"):
        predict_peak_bytes(minilm, train, [1, 1])
    with pytest.raises(ValueError, match=r"unknown targets \['key'\]"):
        predict_peak_bytes(minilm, train, [{"key": 2}] * 6)
    with pytest.raises(ValueError, match="seq_len 1024 exceeds the model's max_positions 512"):
        predict_peak_bytes(minilm, TrainShape(1, 1024), [0] * 6)
    with pytest.raises(ValueError, match="TrainShape.batch=0 is invalid"):
        TrainShape(0, 16)
    with pytest.raises(ValueError, match="lora_targets_per_layer"):
        ModelShape(2, 8, 32, 2, 10, 16, lora_targets_per_layer=[])


def test_parse_and_format_size() -> None:
    assert parse_size("1.5GB") == 1_500_000_000
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("512 MiB") == 512 * 2**20
    assert parse_size("100mb") == 100 * MB
    for bad in ("1.5", "GB", "1.5 GBs", "-1GB", "1,5GB"):
        with pytest.raises(ValueError, match="expected a number and a unit"):
            parse_size(bad)
    assert (format_size(1.5e9), format_size(90_852_864), format_size(512)) == ("1.5 GB", "90.9 MB", "512 B")


def test_profile_for_cycles_tiers() -> None:
    assert [profile_for(i).name for i in range(5)] == ["2GB", "4GB", "8GB", "16GB", "2GB"]
    assert profile_for(1) == DeviceProfile("4GB", 4 * 10**9)
    assert profile_for(1, scale=0.05) == DeviceProfile("4GBx0.05", 200 * MB)
    assert profile_for(3, tiers=("1GiB",)).memory_bytes == 2**30
    with pytest.raises(ValueError, match="partition_id -1 is invalid"):
        profile_for(-1)
    with pytest.raises(ValueError, match="scale 0 is invalid"):
        profile_for(0, scale=0)


def test_gpt2_gelu_new_keeps_four_intermediate_tensors() -> None:
    shape = ModelShape.from_hf_config(GPT2 | {"activation_function": "gelu_new"}, ["c_attn"])
    assert shape.ffn_activation == "gelu_new"
    fused = ModelShape.from_hf_config(GPT2 | {"activation_function": "gelu_pytorch_tanh"}, ["c_attn"])
    train = TrainShape(2, 16)
    extra = (
        predict_peak_bytes(shape, train, [8] * 12)["activations"]
        - predict_peak_bytes(fused, train, [8] * 12)["activations"]
    )
    assert extra == 12 * 3 * 2 * 16 * 3072 * 4  # three more fp32 tensors of width i in each of the 12 layers


@pytest.mark.parametrize(
    ("family", "config", "ranks"),
    [
        (
            "bert",
            {"hidden_size": 64, "intermediate_size": 256, "num_attention_heads": 4, "num_hidden_layers": 4},
            [4] * 4,
        ),
        ("gpt2", {"n_embd": 64, "n_head": 4, "n_layer": 4, "pad_token_id": 0}, [4] * 4),
    ],
)
def test_predicted_activations_match_saved_tensors(tmp_path, family: str, config: dict, ranks: list[int]) -> None:
    """The ``activations`` term against the bytes autograd really keeps (CPU, the project's classifier)."""
    torch = pytest.importorskip("torch")
    from transformers import AutoConfig, AutoModel

    from atlas_flwr.models.classifier import LoraSettings, build_classifier
    from atlas_flwr.models.registry import lora_targets

    hf = AutoConfig.for_model(family, vocab_size=500, max_position_embeddings=64, n_positions=64, **config)
    torch.manual_seed(0)
    AutoModel.from_config(hf).save_pretrained(tmp_path)
    model = build_classifier(str(tmp_path), 2, LoraSettings(rank=ranks[0]))
    model.train()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in params:
            kept.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        return t

    batch, seq = 4, 32
    ids = torch.randint(0, 500, (batch, seq))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    shape = ModelShape.from_hf_config(hf.to_dict(), lora_targets(family))
    predicted = predict_peak_bytes(shape, TrainShape(batch, seq), ranks)["activations"]
    counted = sum(kept.values())
    # The first adapted layer keeps a little less (its input needs no gradient): a small over-count.
    assert 0 <= predicted - counted <= 0.05 * counted, (predicted, counted)


def test_split_client_is_the_truncated_model_plus_sent_activations(minilm: ModelShape) -> None:
    from strategies.split_cut import choose_split, split_client_peak_bytes

    model = minilm
    train = TrainShape(batch=16, seq_len=128)
    ranks = [8] * model.num_layers
    full = predict_peak_bytes(model, train, ranks)
    parts = [split_client_peak_bytes(model, train, ranks, cut) for cut in range(1, model.num_layers)]
    totals = [p["total"] for p in parts]
    assert totals == sorted(totals) and totals[-1] < full["total"]  # deeper cut, more client memory
    assert parts[0]["sent_activations"] == 16 * 128 * model.hidden * 4
    # Cut 1 keeps the embeddings and one block: most of the frozen weights of MiniLM are the embeddings.
    per_block = (full["frozen_weights"] - parts[0]["frozen_weights"]) // (model.num_layers - 1)
    assert 0 < per_block < parts[0]["frozen_weights"]
    cut, chosen = choose_split(model, train, (totals[2] + totals[3]) // 2, ranks)
    assert cut == 3 and chosen["total"] == totals[2]
    assert choose_split(model, train, full["total"], ranks)[0] == model.num_layers - 1
    with pytest.raises(ValueError, match="needs with one block"):
        choose_split(model, train, totals[0] - 1, ranks)
    with pytest.raises(ValueError, match="split point 6 is invalid for a 6-layer model"):
        split_client_peak_bytes(model, train, ranks, 6)


def test_plan_split_ranks_keeps_the_deepest_cut_that_still_adapts_every_client_block(minilm: ModelShape) -> None:
    from strategies.split_cut import plan_split_ranks, split_client_peak_bytes

    train, weights = TrainShape(batch=16, seq_len=128), [1.0] * minilm.num_layers
    peak = {c: split_client_peak_bytes(minilm, train, [8] * minilm.num_layers, c)["total"] for c in (2, 3)}
    cut, ranks, parts = plan_split_ranks(minilm, train, peak[3], weights, max_rank=8)
    assert cut == 3 and ranks == [8] * minilm.num_layers  # the server's half (blocks 3-5) at the cap
    assert parts["total"] <= peak[3]
    assert parts["total"] == split_client_peak_bytes(minilm, train, ranks, cut)["total"]
    # Between the cut-2 and cut-3 peaks at rank 8: block 2's activations outweigh any rank saving, so cut 2.
    tight = (peak[2] + peak[3]) // 2
    cut, ranks, parts = plan_split_ranks(minilm, train, tight, weights, max_rank=8)
    assert cut == 2 and parts["total"] <= tight and ranks == [8] * minilm.num_layers
    fixed, fixed_ranks, _ = plan_split_ranks(minilm, train, tight, weights, max_rank=8, cut=2)
    assert fixed == 2 and fixed_ranks[:2] == [8, 8]
    with pytest.raises(ValueError, match="cannot adapt the client's blocks at any cut"):
        plan_split_ranks(minilm, train, 1_000_000, weights, max_rank=8)


QWEN25_05B = {  # Qwen/Qwen2.5-0.5B config.json, the keys that size the model
    "model_type": "qwen2",
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-06,
    "hidden_act": "silu",
}


def test_kbit_weights_are_priced_per_weight_and_per_scale() -> None:
    qwen = ModelShape.from_hf_config(QWEN25_05B, ["q_proj", "v_proj"])
    h, i, kv, layers = 896, 4864, 128, 24
    linear = layers * (2 * h * h + 2 * h * kv + 3 * h * i)
    rest = qwen.frozen_param_count() - linear  # embeddings, norms, biases: kept in the base dtype
    ranks = [8] * layers
    weights = {
        q: predict_peak_bytes(qwen, TrainShape(4, 256, quantization=q), ranks)["frozen_weights"]
        for q in ("none", "8bit", "4bit")
    }
    assert weights["none"] == 4 * qwen.frozen_param_count()
    rows = layers * (h + kv + kv + h + i + i + h)  # LLM.int8: one fp32 scale per output row
    assert weights["8bit"] == 4 * rest + linear + 4 * rows
    assert weights["4bit"] == round(4 * rest + 0.5 * linear + 4 * linear / 64)  # NF4: fp32 absmax per 64
    # bitsandbytes' 8-bit CPU training path keeps each linear input (QKV share one): 4 widths per layer.
    acts = {
        q: predict_peak_bytes(qwen, TrainShape(4, 256, quantization=q), ranks)["activations"] for q in ("none", "8bit")
    }
    assert acts["8bit"] - acts["none"] == layers * 4 * 256 * (h + h + h + i) * 4
    # Only an fp32 base needs autocast's fp16 weight copies.
    cuda = Calibration.for_device("cuda")
    casts = {
        q: predict_peak_bytes(qwen, TrainShape(4, 256, quantization=q), ranks, calibration=cuda)["weight_casts"]
        for q in ("none", "4bit")
    }
    assert casts["none"] == 2 * linear and casts["4bit"] == 0
    fp16_base = TrainShape(4, 256, weight_bytes=2)
    assert predict_peak_bytes(qwen, fp16_base, ranks, calibration=cuda)["weight_casts"] == 0
    assert predict_peak_bytes(qwen, fp16_base, ranks)["frozen_weights"] == 2 * qwen.frozen_param_count()


def test_checkpointing_keeps_layer_inputs_and_recomputes_one_layer(minilm: ModelShape) -> None:
    from strategies.memory import layer_activation_bytes, lora_activation_bytes

    cal = Calibration()
    for ranks, stored in (([8] * 6, 6), ([0, 0, 0, 0, 4, 16], 2)):
        plain = predict_peak_bytes(minilm, TrainShape(16, 128), ranks)
        ckpt = predict_peak_bytes(minilm, TrainShape(16, 128, checkpointing=True), ranks)
        per_layer = layer_activation_bytes(minilm, TrainShape(16, 128), cal)
        top = max(2 * lora_activation_bytes(TrainShape(16, 128), cal, 384, r) for r in ranks if r)
        assert ckpt["activations"] == stored * 16 * 128 * 384 * 4 + per_layer + top
        assert ckpt["activations"] < plain["activations"]
        moved = ("activations", "workspace", "total")  # the peak moves into backward: a larger workspace
        assert {k: v for k, v in ckpt.items() if k not in moved} == {k: v for k, v in plain.items() if k not in moved}
        assert ckpt["workspace"] == round(
            cal.workspace_bytes + (cal.workspace_layers + cal.checkpoint_layers) * per_layer
        )
    # A budget that binds without checkpointing buys larger ranks with it; the allocator prices the same way.
    budget = predict_peak_bytes(minilm, TrainShape(16, 128), [0, 0, 0, 0, 8, 8])["total"]
    without = allocate_ranks(minilm, TrainShape(16, 128), budget, [1] * 6)
    with_ckpt = allocate_ranks(minilm, TrainShape(16, 128, checkpointing=True), budget, [1] * 6)
    assert sum(with_ckpt.ranks) > sum(without.ranks) and with_ckpt.predicted["total"] <= budget
    assert with_ckpt.predicted == predict_peak_bytes(minilm, TrainShape(16, 128, checkpointing=True), with_ckpt.ranks)


def test_blocks_without_dropout_keep_no_masks_and_no_score_tensors() -> None:
    from strategies.memory import layer_activation_bytes

    qwen = ModelShape.from_hf_config(QWEN25_05B, ["q_proj", "v_proj"])
    dropping = ModelShape.from_hf_config(QWEN25_05B | {"attention_dropout": 0.1}, ["q_proj", "v_proj"])
    assert not qwen.dropout and dropping.dropout and ModelShape.from_hf_config(MINILM, ["query", "value"]).dropout
    train, cal = TrainShape(2, 128), Calibration()
    tokens = 2 * 128
    # Q, K, V and the two norm inputs (fp32), gate/up/SiLU outputs, the norm statistics: nothing else.
    kept = 4 * (5 * tokens * 896 + 3 * tokens * 4864 + 4 * tokens)
    assert layer_activation_bytes(qwen, train, cal) == kept
    scores = 2 * 14 * 128 * 128
    masks = 8 * tokens * 896 + 4 * scores
    assert layer_activation_bytes(dropping, train, cal) == kept + 4 * 2 * scores + masks
