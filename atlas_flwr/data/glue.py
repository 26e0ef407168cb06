"""GLUE tasks: loading (local parquet or the Hugging Face hub) and client partitions."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import datasets
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, Partitioner

from atlas_flwr.common.errors import DataError

HUB_DATASET = "nyu-mll/glue"


@dataclass(frozen=True)
class TaskSpec:
    """What a GLUE task looks like: its text columns, classes and official metric."""

    name: str
    text_columns: tuple[str, ...]
    num_labels: int
    main_metric: str


TASKS: dict[str, TaskSpec] = {
    "sst2": TaskSpec("sst2", ("sentence",), 2, "accuracy"),
    "mrpc": TaskSpec("mrpc", ("sentence1", "sentence2"), 2, "f1"),
    "cola": TaskSpec("cola", ("sentence",), 2, "mcc"),
    "qnli": TaskSpec("qnli", ("sentence1", "sentence2"), 2, "accuracy"),
    "rte": TaskSpec("rte", ("sentence1", "sentence2"), 2, "accuracy"),
}

# The hub names the pair columns per task; the local parquet files use sentence1/2.
_HUB_COLUMNS = {"qnli": {"question": "sentence1", "sentence": "sentence2"}}


def task_spec(name: str) -> TaskSpec:
    """Look up a task by name, with a one-line error for an unknown one."""
    if name not in TASKS:
        raise DataError(f"unknown task {name!r}: expected one of {', '.join(TASKS)}")
    return TASKS[name]


@lru_cache(maxsize=32)
def load_split(task: str, split: str, data_dir: str = "") -> datasets.Dataset:
    """Load one split of a task, from ``{data_dir}/{task}/{split}.parquet`` or the hub.

    An empty ``data_dir`` means the hub (``nyu-mll/glue``), which needs network access.
    """
    spec = task_spec(task)
    if data_dir:
        root = Path(data_dir).expanduser()
        if not root.is_dir():
            raise DataError(f"data-dir {str(root)!r} is not a directory: expected a folder with <task>/<split>.parquet")
        path = root / task / f"{split}.parquet"
        if not path.is_file():
            found = sorted(p.stem for p in (root / task).glob("*.parquet"))
            raise DataError(f"missing split file {str(path)!r}: splits found for {task}: {found or 'none'}")
        ds = datasets.Dataset.from_parquet(str(path), keep_in_memory=True)
    else:
        try:
            ds = datasets.load_dataset(HUB_DATASET, task, split=split)
        except Exception as err:  # the hub raises many types; the user needs one line
            raise DataError(
                f"cannot load {HUB_DATASET}/{task} split {split!r} from the hub ({type(err).__name__}); "
                "set data-dir or $ATLAS_DATA_DIR to a local GLUE folder"
            ) from err
        ds = ds.rename_columns(_HUB_COLUMNS.get(task, {}))
    missing = [c for c in (*spec.text_columns, "label") if c not in ds.column_names]
    if missing:
        raise DataError(f"{task}/{split} lacks columns {missing}: expected {list(spec.text_columns) + ['label']}")
    keep = ["idx"] if "idx" in ds.column_names else []  # row ids let tests check partitions
    return ds.select_columns([*keep, *spec.text_columns, "label"])


def make_partitioner(kind: str, num_partitions: int, alpha: float, seed: int) -> Partitioner:
    """A flwr-datasets partitioner: IID shards or a label Dirichlet with ``alpha``."""
    if kind == "iid":
        return IidPartitioner(num_partitions=num_partitions)
    if kind == "dirichlet":
        return DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=alpha,
            min_partition_size=2,
            self_balancing=False,
            shuffle=True,
            seed=seed,
        )
    raise DataError(f"unknown partitioner {kind!r}: expected iid or dirichlet")


def client_partition(
    task: str,
    partition_index: int,
    num_partitions: int,
    *,
    data_dir: str,
    partitioner: str,
    alpha: float,
    seed: int,
    max_samples: int,
) -> datasets.Dataset:
    """The train rows of one client: its partition of the task, capped at ``max_samples``.

    The task is shuffled once with ``seed`` before partitioning, because the IID
    partitioner takes contiguous shards. ``max_samples`` = 0 keeps the whole partition.
    """
    if not 0 <= partition_index < num_partitions:
        raise DataError(f"partition {partition_index} out of range: expected 0..{num_partitions - 1}")
    part = make_partitioner(partitioner, num_partitions, alpha, seed)
    part.dataset = load_split(task, "train", data_dir).shuffle(seed=seed)
    rows = part.load_partition(partition_index)
    if max_samples and len(rows) > max_samples:
        rows = rows.select(range(max_samples))
    return rows


def eval_rows(task: str, *, data_dir: str, max_samples: int, seed: int) -> datasets.Dataset:
    """Validation rows of a task; the same subset for every client when capped."""
    rows = load_split(task, "validation", data_dir)
    if max_samples and len(rows) > max_samples:
        rows = rows.shuffle(seed=seed).select(range(max_samples))
    return rows
