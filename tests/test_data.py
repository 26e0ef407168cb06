"""GLUE loading, flwr-datasets partitions and tokenization, on the real parquet files."""

from __future__ import annotations

import numpy as np
import pytest

from atlas_flwr.common.errors import DataError
from atlas_flwr.data import TASKS, client_partition, eval_rows, load_split, make_loader, task_spec, tokenize
from atlas_flwr.models.classifier import load_tokenizer


def _parts(glue_dir: str, task: str, n: int, kind: str, seed: int = 7, cap: int = 0) -> list:
    return [
        client_partition(task, i, n, data_dir=glue_dir, partitioner=kind, alpha=0.3, seed=seed, max_samples=cap)
        for i in range(n)
    ]


@pytest.mark.parametrize("task", sorted(TASKS))
def test_every_task_loads_train_and_validation(glue_dir: str, task: str) -> None:
    spec = task_spec(task)
    for split in ("train", "validation"):
        rows = load_split(task, split, glue_dir)
        assert len(rows) > 100
        assert set(spec.text_columns) <= set(rows.column_names)
        assert set(np.unique(rows["label"])) == {0, 1}


@pytest.mark.parametrize("kind", ["iid", "dirichlet"])
def test_partitions_are_disjoint_and_deterministic(glue_dir: str, kind: str) -> None:
    first = _parts(glue_dir, "mrpc", 3, kind)
    again = _parts(glue_dir, "mrpc", 3, kind)
    ids = [set(p["idx"]) for p in first]
    assert [sorted(p["idx"]) for p in again] == [sorted(s) for s in ids]
    assert all(not (a & b) for i, a in enumerate(ids) for b in ids[i + 1 :])
    if kind == "iid":  # IID shards cover the task exactly
        assert sum(len(s) for s in ids) == len(load_split("mrpc", "train", glue_dir))


def test_another_seed_gives_other_partitions(glue_dir: str) -> None:
    a = _parts(glue_dir, "rte", 2, "iid", seed=1)[0]["idx"]
    b = _parts(glue_dir, "rte", 2, "iid", seed=2)[0]["idx"]
    assert set(a) != set(b)


def test_dirichlet_skews_labels_more_than_iid(glue_dir: str) -> None:
    def spread(parts: list) -> float:
        return float(np.std([np.mean(p["label"]) for p in parts]))

    assert spread(_parts(glue_dir, "sst2", 4, "dirichlet")) > 3 * spread(_parts(glue_dir, "sst2", 4, "iid"))


def test_cap_keeps_a_random_subset(glue_dir: str) -> None:
    parts = _parts(glue_dir, "sst2", 2, "iid", cap=50)
    assert [len(p) for p in parts] == [50, 50]
    assert not set(parts[0]["idx"]) & set(parts[1]["idx"])
    assert max(parts[0]["idx"]) > 1000  # not the head of the file


def test_eval_rows_same_subset_for_every_caller(glue_dir: str) -> None:
    a = eval_rows("cola", data_dir=glue_dir, max_samples=40, seed=3)
    b = eval_rows("cola", data_dir=glue_dir, max_samples=40, seed=3)
    assert len(a) == 40 and a["idx"] == b["idx"]
    assert len(eval_rows("cola", data_dir=glue_dir, max_samples=0, seed=3)) == 1043


def test_bad_inputs_give_one_line_errors(glue_dir: str, tmp_path) -> None:
    with pytest.raises(DataError, match=r"unknown task 'sts-b': expected one of sst2, mrpc"):
        task_spec("sts-b")
    with pytest.raises(DataError, match="is not a directory"):
        load_split("sst2", "train", str(tmp_path / "nope"))
    (tmp_path / "sst2").mkdir()
    with pytest.raises(DataError, match=r"missing split file .*splits found for sst2: none"):
        load_split("sst2", "train", str(tmp_path))
    with pytest.raises(DataError, match=r"splits found for qnli: \['dev_full', 'train', 'validation'\]"):
        load_split("qnli", "test", glue_dir)
    for err in (DataError("x"),):
        assert "\n" not in str(err)


def test_tokenize_truncates_and_batches_pad_to_longest(glue_dir: str) -> None:
    tokenizer = load_tokenizer("minilm-l6")
    rows = eval_rows("mrpc", data_dir=glue_dir, max_samples=32, seed=0)
    enc = tokenize(rows, task_spec("mrpc"), tokenizer, max_length=24)
    lengths = [len(ids) for ids in enc["input_ids"]]
    assert max(lengths) == 24  # MRPC pairs are longer than 24 tokens: truncated
    assert "token_type_ids" in enc.column_names  # pairs mark their second sentence
    short = tokenize(eval_rows("sst2", data_dir=glue_dir, max_samples=32, seed=0), task_spec("sst2"), tokenizer, 128)
    batch = next(iter(make_loader(short, tokenizer, 8, shuffle=False)))
    first8 = [len(ids) for ids in short["input_ids"][:8]]
    assert batch["input_ids"].shape == (8, max(first8))
    assert batch["attention_mask"].sum().item() == sum(first8)


def test_loader_order_depends_on_seed_only(glue_dir: str) -> None:
    tokenizer = load_tokenizer("minilm-l6")
    enc = tokenize(eval_rows("sst2", data_dir=glue_dir, max_samples=64, seed=0), task_spec("sst2"), tokenizer, 64)

    def order(seed: int) -> list:
        return [
            b["labels"].tolist() + b["input_ids"][:, 1].tolist()
            for b in make_loader(enc, tokenizer, 16, shuffle=True, seed=seed)
        ]

    assert order(5) == order(5)
    assert order(5) != order(6)


def test_length_grouped_batches_pad_less_and_keep_every_row(glue_dir: str) -> None:
    tokenizer = load_tokenizer("minilm-l6")
    rows = client_partition("mrpc", 0, 1, data_dir=glue_dir, partitioner="iid", alpha=1.0, seed=0, max_samples=256)
    enc = tokenize(rows, task_spec("mrpc"), tokenizer, 128)

    def padded_tokens(grouped: bool, seed: int) -> tuple[int, list]:
        batches = list(make_loader(enc, tokenizer, 16, shuffle=True, seed=seed, group_by_length=grouped))
        first_ids = sorted(int(i) for b in batches for i in b["input_ids"][:, 1])
        return sum(b["input_ids"].numel() for b in batches), first_ids

    random_cost, random_rows = padded_tokens(False, 1)
    grouped_cost, grouped_rows = padded_tokens(True, 1)
    assert grouped_rows == random_rows  # same rows, another order
    assert grouped_cost < 0.9 * random_cost  # 0.82 here: 4 mega-batches of 64 rows each
    assert padded_tokens(True, 1) == padded_tokens(True, 1)
