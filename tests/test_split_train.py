"""SplitLoRA steps: exchanging activations and their gradients trains exactly like the joint model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from atlas_flwr.common.errors import AtlasError
from atlas_flwr.common.split_train import ClientSide, ServerSide
from atlas_flwr.models.classifier import LoraSettings, build_classifier, load_tokenizer
from atlas_flwr.models.split import SplitClassifier

TEXTS = ["a gripping, funny film", "dull", "the cat sat on the mat", "rain again, and again"]
LR, HEAD_LR, WD = 0.01, 0.05, 0.01


@pytest.fixture(scope="module")
def no_dropout_bert(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A tiny 3-block BERT without dropout, so the joint and split runs draw no random masks."""
    from transformers import AutoModel, BertConfig

    tokenizer = load_tokenizer("minilm-l6")
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    path: Path = tmp_path_factory.mktemp("bert3")
    AutoModel.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _model(path: str):
    model = build_classifier(path, 2, LoraSettings(rank=4, dropout=0.0), seed=0)
    model.dropout.p = 0.0
    return model


def _batches(path: str):
    tokenizer = load_tokenizer(path)
    out = []
    for i in range(3):
        batch = dict(tokenizer(TEXTS[i:] + TEXTS[:i], padding=True, return_tensors="pt"))
        batch["labels"] = torch.tensor([1, 0, 1, 0])
        out.append(batch)
    return out


def test_split_steps_equal_joint_steps(no_dropout_bert: str) -> None:
    joint, split_model = _model(no_dropout_bert), _model(no_dropout_bert)
    split = SplitClassifier(split_model, "bert", cut=2)
    client = ClientSide(split, lr=LR, weight_decay=WD)
    server = ServerSide(split, lr=LR, head_lr=HEAD_LR, weight_decay=WD)
    named = [(n, p) for n, p in joint.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for n, p in named if not n.startswith("head.")], "lr": LR},
            {"params": [p for n, p in named if n.startswith("head.")], "lr": HEAD_LR},
        ],
        weight_decay=WD,
    )
    for step, batch in enumerate(_batches(no_dropout_bert)):
        joint.train()
        loss = torch.nn.functional.cross_entropy(
            joint(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]), batch["labels"]
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

        activations = client.forward(batch, seed=step)
        grad, split_loss = server.step(activations, batch["attention_mask"], batch["labels"], seed=step)
        client.backward(grad)
        assert split_loss == pytest.approx(loss.item(), abs=1e-6)
    server.settle()  # the server takes each step when the client's next message arrives; this is the last
    moved = 0
    for (name, p_joint), p_split in zip(joint.named_parameters(), split_model.parameters(), strict=True):
        if p_joint.requires_grad:
            torch.testing.assert_close(p_split, p_joint, atol=1e-6, rtol=1e-5, msg=name)
            moved += int("lora_B" in name and p_split.abs().sum() > 0)
    assert moved == 6  # every block's query and value B left zero: both sides trained


def test_backward_in_another_process_recomputes_the_same_step(no_dropout_bert: str) -> None:
    batches = _batches(no_dropout_bert)
    results = []
    for same_process in (True, False):
        model = _model(no_dropout_bert)
        split = SplitClassifier(model, "bert", cut=1)
        client, server = (
            ClientSide(split, lr=LR, weight_decay=WD),
            ServerSide(split, lr=LR, head_lr=HEAD_LR, weight_decay=WD),
        )
        for step, batch in enumerate(batches):
            activations = client.forward(batch, seed=step)
            grad, _ = server.step(activations, batch["attention_mask"], batch["labels"], seed=step)
            if not same_process:  # a fresh worker: same parameters, optimizer state from context.state
                state = client.optimizer_state()
                client = ClientSide(split, lr=LR, weight_decay=WD)
                client.load_optimizer_state(state)
                client.backward(grad, batch, seed=step)
            else:
                client.backward(grad)
        results.append([p.detach().clone() for p in split.parameters("client")])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b)


def test_bad_gradient_is_refused(no_dropout_bert: str) -> None:
    split = SplitClassifier(_model(no_dropout_bert), "bert", cut=1)
    client = ClientSide(split, lr=LR, weight_decay=WD)
    batch = _batches(no_dropout_bert)[0]
    activations = client.forward(batch, seed=0)
    with pytest.raises(AtlasError, match="not finite"):
        client.backward(torch.full_like(activations, float("nan")))
    with pytest.raises(AtlasError, match="did not run"):
        ClientSide(split, lr=LR, weight_decay=WD).backward(torch.zeros_like(activations))


def test_one_loss_scale_across_the_cut(no_dropout_bert: str) -> None:
    """fp16 loss scaling as a CUDA run uses it, here in fp32: a power-of-two scale changes no step, and an
    overflow in either half skips both halves' steps and halves the scale, as GradScaler does for one model."""
    runs = []
    for scaling in (False, True):
        split = SplitClassifier(_model(no_dropout_bert), "bert", cut=2)
        client = ClientSide(split, lr=LR, weight_decay=WD)
        server = ServerSide(split, lr=LR, head_lr=HEAD_LR, weight_decay=WD, loss_scaling=scaling)
        for step, batch in enumerate(_batches(no_dropout_bert)):
            activations = client.forward(batch, seed=step)
            grad, _ = server.step(activations, batch["attention_mask"], batch["labels"], seed=step)
            scale = server.loss_scale.scale if scaling else None
            assert not client.backward(grad, scale=scale, skip=server.overflowed)
        server.settle()
        assert server.loss_scale.scale == (2.0**16 if scaling else 1.0)
        runs.append([p.detach().clone() for p in split.model.parameters() if p.requires_grad])
    for a, b in zip(*runs, strict=True):
        torch.testing.assert_close(a, b)

    split = SplitClassifier(_model(no_dropout_bert), "bert", cut=2)
    client = ClientSide(split, lr=LR, weight_decay=WD)
    server = ServerSide(split, lr=LR, head_lr=HEAD_LR, weight_decay=WD, loss_scaling=True)
    before = [p.detach().clone() for p in split.model.parameters() if p.requires_grad]
    batch = _batches(no_dropout_bert)[0]
    server.loss_scale.scale = 2.0**200  # the scaled loss overflows fp32, as 2**16 can overflow fp16
    grad, _ = server.step(client.forward(batch, seed=0), batch["attention_mask"], batch["labels"], seed=0)
    assert server.overflowed
    assert client.backward(grad, scale=server.loss_scale.scale, skip=True)  # a non-finite gradient: skipped
    server.settle(client_overflow=True)
    assert server.loss_scale.scale == 2.0**199
    after = [p.detach() for p in split.model.parameters() if p.requires_grad]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))

    # Only the client's half overflows: the server skips its step too.
    server.loss_scale.scale = 2.0**10
    grad, _ = server.step(client.forward(batch, seed=1), batch["attention_mask"], batch["labels"], seed=1)
    assert not server.overflowed
    top = [p.detach().clone() for p in split.parameters("server")]
    server.settle(client_overflow=True)
    assert all(torch.equal(a, b) for a, b in zip(top, split.parameters("server"), strict=True))
    assert server.loss_scale.scale == 2.0**9


def test_random_state_round_trips_and_a_cpu_half_passes_the_cuda_state_on() -> None:
    from atlas_flwr.common.split_train import RngState, rng_arrays, rng_from

    cuda_state = torch.arange(16, dtype=torch.uint8)  # what a CUDA bottom sent; a CPU top draws nothing from it
    received = RngState(torch.get_rng_state(), cuda_state)
    after = RngState.now(torch.device("cpu"), carry=received)
    assert after.cuda_state is cuda_state
    assert rng_from(rng_arrays(after)).same_as(after) and not after.same_as(RngState(after.cpu_state))
    assert rng_from(rng_arrays(7)) == 7
