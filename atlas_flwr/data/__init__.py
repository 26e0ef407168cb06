"""Data: GLUE loading and partitions, tokenization and batching."""

from atlas_flwr.data.glue import (
    TASKS,
    TaskSpec,
    client_partition,
    eval_rows,
    load_split,
    task_spec,
)
from atlas_flwr.data.tokenize import make_loader, tokenize

__all__ = [
    "TASKS",
    "TaskSpec",
    "client_partition",
    "eval_rows",
    "load_split",
    "make_loader",
    "task_spec",
    "tokenize",
]
