"""The run configuration: every key of ``[tool.flwr.app.config]``, read and checked once.

``pyproject.toml`` lists the keys and their defaults; this module is the one place that
reads them. A bad value ends in a :class:`ConfigError`, one line that names the key, the
value and what is allowed.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from atlas_flwr.common.errors import ConfigError

STRATEGIES = (
    "centralized",
    "local-only",
    "fedavg",
    "fedavg-cluster",
    "homlora",
    "hetlora",
    "flexlora",
    "atlas-no-laplacian",
    "atlas",
    "atlas-split",
)
#: The phase switches; "preset" takes the value from ``strategy`` (see ``strategies.pipeline.PRESETS``).
CLUSTERINGS = ("preset", "none", "learned", "oracle")
RANK_MODES = ("preset", "uniform", "budget", "common")
AGGREGATIONS = ("preset", "exact", "zero-pad", "svd-dense", "factor-avg", "none")
FINGERPRINT_KINDS = ("embedding", "embedding-labels", "lora-grad")
PARTITIONERS = ("iid", "dirichlet")
POOLINGS = ("mean", "cls", "last")
#: Pad each batch to its own longest row (3.5x faster on CPU) or to ``max-length`` (static shapes).
PADDINGS = ("longest", "max-length")
#: How the frozen base model is held: its dtype, and k-bit quantization of its linear layers (bitsandbytes).
BASE_DTYPES = ("fp32", "bf16", "fp16")
QUANTIZATIONS = ("none", "8bit", "4bit")
DEVICES = ("auto", "cpu", "cuda")
WORKLOADS = ("glue", "eurosat")
#: Wire precision of both workloads, and the EuroSAT compute precision (atlas_flwr/common/codec.py).
PRECISIONS = ("fp32", "fp16", "int8")
#: Learning rate per round: constant, or cosine from ``lr`` to ``lr / 100`` over ``num-server-rounds``.
LR_SCHEDULES = ("constant", "cosine")
#: What a budget-bound client does with the layers its budget cannot train: hold and use them frozen, or drop them.
FROZEN_LAYERS = ("use", "drop")
#: What a client does when the method's rank plan exceeds its device (memory or rank cap): train the largest
#: plan that fits, sit out training (it still takes its group's model), or train anyway (v1, infeasible).
OVER_BUDGET = ("shrink", "drop", "train")
#: How re-factored adapters are split into B and A (strategies.aggregation.FACTOR_SPLITS).
FACTOR_SPLITS = ("balanced", "a-orthonormal")
#: How a group's server step is sized (strategies.drift.SERVER_LR_RULES).
SERVER_LR_RULES = ("fixed", "keep-length")
#: The Laplacian graph's bandwidth (strategies.pipeline.LAPLACIAN_GRAPHS).
LAPLACIAN_GRAPHS = ("median", "cluster")
#: What the Laplacian mixes under exact aggregation (strategies.pipeline.LAPLACIAN_INPUTS).
LAPLACIAN_INPUTS = ("aggregate", "held")

#: Environment variables that stand in for an empty ``data-dir`` / ``output-dir``.
DATA_DIR_ENV = "ATLAS_DATA_DIR"
OUTPUT_DIR_ENV = "ATLAS_OUTPUT_DIR"
EUROSAT_DATA_ENV = "ATLAS_EUROSAT_DATA"


@dataclass(frozen=True)
class _Rule:
    kind: type
    check: Callable[[Any], bool] = lambda _v: True
    allowed: str = ""


def _choice(*values: str) -> _Rule:
    return _Rule(str, lambda v: v in values, "one of " + ", ".join(values))


def _int_at_least(low: int) -> _Rule:
    return _Rule(int, lambda v: v >= low, f"an integer >= {low}")


def _float_in(low: float, high: float, *, open_low: bool = False) -> _Rule:
    bracket = "(" if open_low else "["

    def check(v: float) -> bool:
        return (v > low if open_low else v >= low) and v <= high

    return _Rule(float, check, f"a number in {bracket}{low}, {high}]")


def _sizes_rule() -> _Rule:
    from atlas_flwr.common.devices import parse_size

    def check(v: str) -> bool:
        try:
            return all(parse_size(t) > 0 for t in v.split(",")) and bool(v.strip())
        except ValueError:
            return False

    return _Rule(str, check, "a comma-separated list of sizes such as 2GB,4GB,8GB,16GB")


def _tasks_rule() -> _Rule:
    from atlas_flwr.data.glue import TASKS

    def check(v: str) -> bool:
        names = [t.strip() for t in v.split(",") if t.strip()]
        return bool(names) and all(n in TASKS for n in names) and len(set(names)) == len(names)

    return _Rule(str, check, "a comma-separated list of distinct tasks from " + ", ".join(TASKS))


def _parse_counts(value: int | str) -> tuple[int | None, dict[str, int]]:
    """``3`` or ``"3"`` -> (3, {}); ``"sst2:3,qnli:2"`` -> (None, {...}); ``"2,qnli:4"`` -> (2, {"qnli": 4})."""
    if isinstance(value, int):
        return value, {}
    default, counts = None, {}
    for item in value.split(","):
        name, _, count = item.strip().rpartition(":")
        if name:
            counts[name.strip()] = int(count)
        else:
            default = int(count)
    return default, counts


def _clients_rule() -> _Rule:
    from atlas_flwr.data.glue import TASKS

    def check(v: int | str) -> bool:
        if isinstance(v, bool) or not isinstance(v, int | str):
            return False
        try:
            default, counts = _parse_counts(v)
        except ValueError:
            return False
        numbers = [*counts.values(), *([] if default is None else [default])]
        return bool(numbers) and all(n >= 1 for n in numbers) and set(counts) <= set(TASKS)

    return _Rule(object, check, 'an integer >= 1, or per task such as "sst2:3,qnli:2,rte:1" (a bare number: the rest)')


def _tasks_map_rule(
    minimum: int = 0, allowed: str = 'task:rows pairs such as "cola:0,qnli:1024" (0: every row)'
) -> _Rule:
    from atlas_flwr.data.glue import TASKS

    def check(v: str) -> bool:
        try:
            pairs = [item.split(":") for item in v.split(",")] if v else []
            return all(len(p) == 2 and p[0].strip() in TASKS and int(p[1]) >= minimum for p in pairs)
        except ValueError:
            return False

    return _Rule(str, check, f"empty or {allowed}")


def _partitioner_map_rule() -> _Rule:
    from atlas_flwr.data.glue import TASKS

    def setting(value: str) -> bool:
        kind, _, alpha = value.strip().partition("-")
        if kind == "iid":
            return not alpha
        try:
            return kind == "dirichlet" and float(alpha) > 0
        except ValueError:
            return False

    def check(v: str) -> bool:
        pairs = [item.split(":") for item in v.split(",")] if v else []
        return all(len(p) == 2 and p[0].strip() in TASKS and setting(p[1]) for p in pairs)

    return _Rule(str, check, 'empty or task:setting pairs such as "sst2:dirichlet-0.3,qnli:iid"')


def _task_entry(pairs: str, task: str, default: int) -> int:
    """``task``'s integer in a checked "task:n,task:n" string, else ``default``."""
    for item in pairs.split(",") if pairs else ():
        name, value = item.split(":")
        if name.strip() == task:
            return int(value)
    return default


_RULES: dict[str, _Rule] = {
    "workload": _choice(*WORKLOADS),
    "strategy": _choice(*STRATEGIES),
    "num-server-rounds": _int_at_least(1),
    "tasks": _tasks_rule(),
    "clients-per-task": _clients_rule(),
    "partitioner": _choice(*PARTITIONERS),
    "dirichlet-alpha": _float_in(0.0, 1e6, open_low=True),
    "partitioner-by-task": _partitioner_map_rule(),
    "max-samples-per-client": _int_at_least(0),
    "max-samples-by-task": _tasks_map_rule(),
    "max-eval-samples": _int_at_least(0),
    "data-dir": _Rule(str),
    "model": _Rule(str, bool, "a model alias or a local model directory"),
    "pooling": _choice(*POOLINGS),
    "max-length": _int_at_least(8),
    "base-dtype": _choice(*BASE_DTYPES),
    "quantization": _choice(*QUANTIZATIONS),
    "gradient-checkpointing": _Rule(bool, allowed="true or false"),
    "padding": _choice(*PADDINGS),
    "lora-rank": _int_at_least(1),
    "lora-alpha": _float_in(0.0, 1e6, open_low=True),
    "lora-dropout": _float_in(0.0, 0.9),
    "local-epochs": _int_at_least(1),
    "local-epochs-by-task": _tasks_map_rule(1, 'task:epochs pairs such as "qnli:2" (epochs >= 1)'),
    "batch-size": _int_at_least(1),
    "group-by-length": _Rule(bool, allowed="true or false"),
    "eval-batch-size": _int_at_least(1),
    "lr": _float_in(0.0, 1.0, open_low=True),
    "head-lr": _float_in(0.0, 1.0, open_low=True),
    "weight-decay": _float_in(0.0, 1.0),
    "clustering": _choice(*CLUSTERINGS),
    "ranks": _choice(*RANK_MODES),
    "aggregation": _choice(*AGGREGATIONS),
    "laplacian-eta": _float_in(0.0, 1.0),
    "laplacian-graph": _choice(*LAPLACIAN_GRAPHS),
    "laplacian-input": _choice(*LAPLACIAN_INPUTS),
    "frozen-layers": _choice(*FROZEN_LAYERS),
    "server-lr": _float_in(0.0, 10.0, open_low=True),
    "factor-split": _choice(*FACTOR_SPLITS),
    "server-lr-rule": _choice(*SERVER_LR_RULES),
    "over-budget": _choice(*OVER_BUDGET),
    "dp-clip": _float_in(0.0, 1e6),
    "dp-noise": _float_in(0.0, 1e3),
    "hetlora-gamma": _float_in(0.0, 1.0, open_low=True),
    "hetlora-lambda": _float_in(0.0, 1e3),
    "fingerprint-kind": _choice(*FINGERPRINT_KINDS),
    "fingerprint-rows": _int_at_least(2),
    "fingerprint-dim": _int_at_least(2),
    "fingerprint-depth": _float_in(0.0, 1.0),
    "fingerprint-clip": _float_in(0.0, 1e6, open_low=True),
    "fingerprint-noise": _float_in(0.0, 1e3),
    "fingerprint-delta": _float_in(0.0, 0.1, open_low=True),
    "cluster-k-max": _int_at_least(2),
    "device-tiers": _sizes_rule(),
    "device-scale": _float_in(0.0, 1e3, open_low=True),
    "rank-tiers": _Rule(
        str,
        lambda v: v == "" or all(t.strip().isdigit() and int(t) >= 1 for t in v.split(",")),
        'empty (no cap) or a comma-separated list of ranks >= 1 such as "2,4,8,16"',
    ),
    "split": _Rule(
        str,
        lambda v: v in ("none", "auto") or (v.isdigit() and int(v) >= 1),
        "none, auto, or a block index >= 1 (the first block on the server)",
    ),
    "eurosat-clients": _int_at_least(1),
    "eurosat-data": _Rule(str),
    "precision": _choice(*PRECISIONS),
    "time-limit-minutes": _float_in(0.0, 1e6),
    "resume-from": _Rule(str),
    "min-clients": _int_at_least(1),
    "fraction-train": _float_in(0.0, 1.0, open_low=True),
    "min-train-nodes": _int_at_least(1),
    "reply-timeout-seconds": _float_in(0.0, 1e6),
    "inject-failures": _float_in(0.0, 0.9),
    "lr-schedule": _choice(*LR_SCHEDULES),
    "seed": _int_at_least(0),
    "device": _choice(*DEVICES),
    "output-dir": _Rule(str),
    "log-dir": _Rule(
        str,
        lambda v: v in ("none", "run") or os.path.isabs(v),
        "none, run (<run dir>/tensorboard) or an absolute folder (events in <folder>/<run name>)",
    ),
    "run-name": _Rule(str, lambda v: "/" not in v and v not in (".", ".."), "a name without '/'"),
    "measure-memory": _Rule(bool, allowed="true or false"),
}


def _coerce(key: str, value: Any, rule: _Rule) -> Any:
    # TOML gives ints where a float is meant (lr = 1) and bools are ints in Python.
    if rule.kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    # ``split = 3`` on a command line is an int; the key also takes words, so it is a string.
    if key == "split" and isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if isinstance(value, bool) != (rule.kind is bool) or not isinstance(value, rule.kind):
        raise ConfigError(key, value, rule.allowed or f"a {rule.kind.__name__}")
    if not rule.check(value):
        raise ConfigError(key, value, rule.allowed)
    return value


@dataclass(frozen=True)
class Config:
    """The validated run configuration (attribute names are the keys in snake_case)."""

    workload: str
    strategy: str
    num_server_rounds: int
    tasks: tuple[str, ...]
    clients_per_task: int | str
    partitioner: str
    dirichlet_alpha: float
    partitioner_by_task: str
    max_samples_per_client: int
    max_samples_by_task: str
    max_eval_samples: int
    data_dir: str
    model: str
    pooling: str
    max_length: int
    base_dtype: str
    quantization: str
    gradient_checkpointing: bool
    padding: str
    lora_rank: int
    lora_alpha: float
    lora_dropout: float
    local_epochs: int
    local_epochs_by_task: str
    batch_size: int
    group_by_length: bool
    eval_batch_size: int
    lr: float
    head_lr: float
    weight_decay: float
    clustering: str
    ranks: str
    aggregation: str
    laplacian_eta: float
    laplacian_graph: str
    laplacian_input: str
    frozen_layers: str
    server_lr: float
    factor_split: str
    server_lr_rule: str
    over_budget: str
    dp_clip: float
    dp_noise: float
    hetlora_gamma: float
    hetlora_lambda: float
    fingerprint_kind: str
    fingerprint_rows: int
    fingerprint_dim: int
    fingerprint_depth: float
    fingerprint_clip: float
    fingerprint_noise: float
    fingerprint_delta: float
    cluster_k_max: int
    device_tiers: str
    device_scale: float
    rank_tiers: str
    split: str
    eurosat_clients: int
    eurosat_data: str
    precision: str
    time_limit_minutes: float
    resume_from: str
    min_clients: int
    fraction_train: float
    min_train_nodes: int
    reply_timeout_seconds: float
    inject_failures: float
    lr_schedule: str
    seed: int
    device: str
    output_dir: str
    log_dir: str
    run_name: str
    measure_memory: bool

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> Config:
        """Check every key of a Flower run config and build the :class:`Config`.

        Raises
        ------
        ConfigError
            On a missing, unknown, mistyped or out-of-range key.
        """
        unknown = sorted(set(run_config) - set(_RULES))
        if unknown:
            raise ConfigError(unknown[0], run_config[unknown[0]], "a key of " + ", ".join(_RULES))
        values: dict[str, Any] = {}
        for key, rule in _RULES.items():
            if key not in run_config:
                raise ConfigError(key, "<missing>", rule.allowed or f"a {rule.kind.__name__}")
            values[key.replace("-", "_")] = _coerce(key, run_config[key], rule)
        values["tasks"] = tuple(t.strip() for t in values["tasks"].split(",") if t.strip())
        default, counts = _parse_counts(values["clients_per_task"])
        missing = [t for t in values["tasks"] if t not in counts] if default is None else []
        extra = sorted(set(counts) - set(values["tasks"]))
        if missing or extra:
            raise ConfigError(
                "clients-per-task",
                values["clients_per_task"],
                f"a count for every task of tasks = {','.join(values['tasks'])} and no other "
                f"({'missing ' + missing[0] if missing else 'not a task: ' + extra[0]}; a bare number covers the rest)",
            )
        if values["strategy"] == "atlas-split" and values["split"] == "none":
            values["split"] = "auto"  # all four phases: split learning is this preset's fourth
        return cls(**values)

    @property
    def task_clients(self) -> tuple[int, ...]:
        """Clients per task, in ``tasks`` order (``clients-per-task``: one number, or per task)."""
        default, counts = _parse_counts(self.clients_per_task)
        return tuple(counts.get(t, default or 0) for t in self.tasks)

    def clients_for(self, task: str) -> int:
        """How many clients hold ``task`` (its number of partitions)."""
        return self.task_clients[self.tasks.index(task)]

    @property
    def num_clients(self) -> int:
        """Size of the client population: the sum of ``clients-per-task`` (GLUE) or ``eurosat-clients``."""
        if self.workload == "eurosat":
            return self.eurosat_clients
        return sum(self.task_clients)

    def task_of(self, client_id: int) -> tuple[str, int]:
        """Task of a client and its partition index inside that task: clients are numbered task by task."""
        if not 0 <= client_id < self.num_clients:
            raise ConfigError("partition-id", client_id, f"an integer in [0, {self.num_clients})")
        for task, count in zip(self.tasks, self.task_clients, strict=True):
            if client_id < count:
                return task, client_id
            client_id -= count
        raise AssertionError("unreachable: client_id < num_clients")

    @property
    def pooled(self) -> bool:
        """The centralized reference: each task's first client trains on the union of the task's rows."""
        return self.strategy == "centralized"

    def max_samples_for(self, task: str) -> int:
        """A client's row cap for ``task``: its ``max-samples-by-task`` entry, else ``max-samples-per-client``."""
        return _task_entry(self.max_samples_by_task, task, self.max_samples_per_client)

    def epochs_for(self, task: str) -> int:
        """Local epochs per round for ``task``: its ``local-epochs-by-task`` entry, else ``local-epochs``."""
        return _task_entry(self.local_epochs_by_task, task, self.local_epochs)

    def partitioner_for(self, task: str) -> tuple[str, float]:
        """``task``'s partitioner and Dirichlet alpha: its ``partitioner-by-task`` entry, else the run's."""
        for item in self.partitioner_by_task.split(",") if self.partitioner_by_task else ():
            name, setting = item.split(":")
            if name.strip() == task:
                kind, _, alpha = setting.strip().partition("-")
                return kind, float(alpha) if alpha else self.dirichlet_alpha
        return self.partitioner, self.dirichlet_alpha

    @property
    def rank_caps(self) -> tuple[int, ...]:
        """The ``rank-tiers`` as integers (empty: no cap)."""
        return tuple(int(t) for t in self.rank_tiers.split(",")) if self.rank_tiers else ()

    @property
    def pad_to(self) -> int | None:
        """Tokens every batch is padded to, or None for each batch's longest row."""
        return self.max_length if self.padding == "max-length" else None

    def lr_at(self, server_round: int) -> float:
        """The round's learning rate under ``lr-schedule`` (rounds count from 1)."""
        if self.lr_schedule == "constant" or self.num_server_rounds == 1:
            return self.lr
        progress = (server_round - 1) / (self.num_server_rounds - 1)
        floor = self.lr / 100
        return floor + (self.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))

    def resolved_data_dir(self) -> str:
        """The GLUE directory: ``data-dir``, else ``$ATLAS_DATA_DIR``, else '' (the hub)."""
        return self.data_dir or os.environ.get(DATA_DIR_ENV, "")

    def resolved_eurosat_data(self) -> str:
        """The EuroSAT npz: ``eurosat-data``, else ``$ATLAS_EUROSAT_DATA``, else '' (the hub)."""
        return self.eurosat_data or os.environ.get(EUROSAT_DATA_ENV, "")

    def resolved_output_dir(self) -> Path:
        """Absolute output root: ``output-dir``, else ``$ATLAS_OUTPUT_DIR``, else ~/atlas-fl-outputs.

        The ServerApp does not run in the project directory, so a relative path would land
        somewhere unexpected: it is refused.
        """
        raw = self.output_dir or os.environ.get(OUTPUT_DIR_ENV, "")
        path = Path(raw).expanduser() if raw else Path.home() / "atlas-fl-outputs"
        if not path.is_absolute():
            raise ConfigError("output-dir", raw, "an absolute path (the ServerApp's cwd is not the project)")
        return path

    def tensorboard_dir(self, run_dir: Path) -> Path | None:
        """Where the run's TensorBoard events go (``log-dir``), or None."""
        if self.log_dir == "none":
            return None
        return run_dir / "tensorboard" if self.log_dir == "run" else Path(self.log_dir) / run_dir.name

    def to_dict(self) -> dict[str, Any]:
        """Kebab-case dict in the form of the run config (tasks joined back)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name.replace("_", "-")] = ",".join(value) if f.name == "tasks" else value
        return out


def config_keys() -> tuple[str, ...]:
    """Every run-config key this app reads."""
    return tuple(_RULES)
