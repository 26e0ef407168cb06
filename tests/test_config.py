"""Run config: pyproject lists every key, config.py checks each one with a one-line error."""

from __future__ import annotations

import tomllib

import pytest

from atlas_flwr.common.config import Config, config_keys
from atlas_flwr.common.errors import ConfigError
from tests.conftest import ROOT


def test_pyproject_lists_exactly_the_keys_config_reads() -> None:
    with (ROOT / "pyproject.toml").open("rb") as fh:
        keys = set(tomllib.load(fh)["tool"]["flwr"]["app"]["config"])
    assert keys == set(config_keys())


def test_defaults_parse(run_config: dict) -> None:
    cfg = Config.from_run_config(run_config)
    assert cfg.tasks == ("sst2", "mrpc", "cola", "qnli")
    assert cfg.num_clients == 8
    assert cfg.task_of(5) == ("cola", 1)
    assert Config.from_run_config(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    ("key", "value", "allowed"),
    [
        ("strategy", "fedprox", "one of centralized, local-only, fedavg, fedavg-cluster, homlora, hetlora, flexlora"),
        ("tasks", "sst2,stsb", "distinct tasks from sst2"),
        ("tasks", "sst2,sst2", "distinct tasks"),
        ("tasks", "", "distinct tasks"),
        ("clients-per-task", 0, "an integer >= 1"),
        ("clients-per-task", 1.5, "an integer >= 1"),
        ("num-server-rounds", "3", "an integer >= 1"),
        ("partitioner", "shards", "one of iid, dirichlet"),
        ("dirichlet-alpha", 0.0, "a number in (0.0"),
        ("lr", -0.1, "a number in (0.0"),
        ("lora-rank", 0, "an integer >= 1"),
        ("lora-dropout", 1.5, "a number in [0.0, 0.9]"),
        ("pooling", "max", "one of mean, cls, last"),
        ("device", "tpu", "one of auto, cpu, cuda"),
        ("max-length", 4, "an integer >= 8"),
        ("batch-size", True, "an integer >= 1"),
        ("model", "", "a model alias"),
        ("run-name", "a/b", "a name without '/'"),
        ("workload", "vision", "one of glue, eurosat"),
        ("precision", "int4", "one of fp32, fp16, int8"),
        ("lr-schedule", "step", "one of constant, cosine"),
        ("min-clients", 0, "an integer >= 1"),
        ("inject-failures", 0.95, "a number in [0.0, 0.9]"),
        ("reply-timeout-seconds", -1.0, "a number in [0.0"),
        ("time-limit-minutes", -5, "a number in [0.0"),
        ("fingerprint-depth", 1.5, "a number in [0.0, 1.0]"),
        ("laplacian-eta", 2.0, "a number in [0.0, 1.0]"),
        ("laplacian-input", "mixed", "one of aggregate, held"),
        ("quantization", "3bit", "one of none, 8bit, 4bit"),
        ("base-dtype", "fp8", "one of fp32, bf16, fp16"),
        ("gradient-checkpointing", "yes", "true or false"),
        ("device-tiers", "2XB,4GB", "sizes"),
        ("split", "-1", "none, auto, or a block index >= 1"),
        ("clustering", "kmeans", "one of preset, none, learned, oracle"),
        ("eurosat-clients", 0, "an integer >= 1"),
        ("seed", -1, "an integer >= 0"),
        ("group-by-length", "yes", "true or false"),
    ],
)
def test_bad_values_name_key_value_and_allowed(run_config: dict, key: str, value: object, allowed: str) -> None:
    run_config[key] = value
    with pytest.raises(ConfigError) as info:
        Config.from_run_config(run_config)
    message = str(info.value)
    assert "\n" not in message
    assert f"'{key}'" in message and repr(value) in message and allowed in message


def test_a_split_block_written_as_an_integer_is_the_same_as_its_string(run_config: dict) -> None:
    assert Config.from_run_config({**run_config, "split": 3}).split == "3"


def test_missing_and_unknown_keys(run_config: dict) -> None:
    missing = dict(run_config)
    del missing["lr"]
    with pytest.raises(ConfigError, match="'lr' = '<missing>'"):
        Config.from_run_config(missing)
    with pytest.raises(ConfigError, match="'learning-rate'"):
        Config.from_run_config({**run_config, "learning-rate": 0.1})


def test_integer_where_float_is_meant_is_accepted(run_config: dict) -> None:
    run_config["lr"] = 1
    assert Config.from_run_config(run_config).lr == 1.0


def test_output_dir_must_be_absolute(run_config: dict) -> None:
    run_config["output-dir"] = "outputs"
    with pytest.raises(ConfigError, match="absolute path"):
        Config.from_run_config(run_config).resolved_output_dir()


def test_client_id_out_of_range(run_config: dict) -> None:
    with pytest.raises(ConfigError, match=r"'partition-id' = 8 .* \[0, 8\)"):
        Config.from_run_config(run_config).task_of(8)


def test_the_documented_key_table_lists_every_key_the_config_reads() -> None:
    import re

    from tests.conftest import ROOT

    rows = [line for line in (ROOT / "docs" / "configuration.md").read_text().splitlines() if line.startswith("| `")]
    documented = {key for row in rows for key in re.findall(r"`([a-z0-9-]+)`", row.split(" | ")[0])}
    assert documented == set(config_keys())


@pytest.mark.parametrize(
    ("value", "counts", "task_of_last"),
    [(3, (3, 3), ("mrpc", 2)), ("sst2:3,mrpc:1", (3, 1), ("mrpc", 0)), ("2,mrpc:4", (2, 4), ("mrpc", 3))],
)
def test_clients_per_task_takes_one_number_or_one_per_task(run_config: dict, value, counts, task_of_last) -> None:
    cfg = Config.from_run_config(run_config | {"tasks": "sst2,mrpc", "clients-per-task": value})
    assert cfg.task_clients == counts and cfg.num_clients == sum(counts)
    assert [cfg.task_of(i)[0] for i in range(cfg.num_clients)] == ["sst2"] * counts[0] + ["mrpc"] * counts[1]
    assert cfg.task_of(cfg.num_clients - 1) == task_of_last and cfg.clients_for("mrpc") == counts[1]


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        ("sst2:3", "missing mrpc"),
        ("2,qnli:1", "not a task: qnli"),
        ("sst2:0,mrpc:1", "an integer >= 1, or per task"),
        ("sst2:x", "an integer >= 1, or per task"),
        ("wnli:2,sst2:1,mrpc:1", "an integer >= 1, or per task"),
        (True, "an integer >= 1, or per task"),
    ],
)
def test_bad_clients_per_task_is_one_line(run_config: dict, value, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle) as info:
        Config.from_run_config(run_config | {"tasks": "sst2,mrpc", "clients-per-task": value})
    assert "\n" not in str(info.value)


def test_unequal_populations_partition_each_task_among_its_own_clients(run_config: dict) -> None:
    from atlas_flwr.client.local import client_data

    values = run_config | {"tasks": "sst2,mrpc", "clients-per-task": "sst2:3,mrpc:1", "max-samples-per-client": 24}
    cfg = Config.from_run_config(values)
    rows = [{tuple(ids) for ids in client_data(cfg, i).train["input_ids"]} for i in range(4)]
    assert [len(r) for r in rows] == [24, 24, 24, 24]
    assert not rows[0] & rows[1] and not rows[1] & rows[2] and not rows[0] & rows[2]  # three shards of sst2
    assert client_data(cfg, 3).task == "mrpc"
    pooled = Config.from_run_config(values | {"strategy": "centralized"})
    assert len(client_data(pooled, 0).train) == 72 and len(client_data(pooled, 3).train) == 24


def test_each_task_can_have_its_own_partitioner(run_config: dict) -> None:
    from atlas_flwr.client.local import client_data

    values = run_config | {"tasks": "sst2,mrpc", "clients-per-task": 3, "max-samples-per-client": 0}
    values |= {"partitioner-by-task": "sst2:dirichlet-0.1"}  # mrpc keeps the run's iid
    cfg = Config.from_run_config(values)
    assert cfg.partitioner_for("sst2") == ("dirichlet", 0.1) and cfg.partitioner_for("mrpc") == ("iid", 0.5)

    def label_shares(task: str, first: int) -> list[float]:
        return [float(sum(client_data(cfg, first + i).train["labels"]) / len(client_data(cfg, first + i).train))
                for i in range(3)]  # fmt: skip

    skewed, even = label_shares("sst2", 0), label_shares("mrpc", 3)
    assert max(skewed) - min(skewed) > 0.3 and max(even) - min(even) < 0.05
    for bad in ("sst2:dirichlet", "sst2:dirichlet-0", "sst2:iid-2", "wnli:iid", "sst2:zipf"):
        with pytest.raises(ConfigError, match="task:setting pairs"):
            Config.from_run_config(values | {"partitioner-by-task": bad})


def test_each_task_can_have_its_own_local_epochs(run_config: dict, tiny_models: dict) -> None:
    from atlas_flwr.client.local import initial_state, run_train
    from atlas_flwr.client.split_client import batch_plan
    from atlas_flwr.common.records import to_numpy

    values = run_config | {"tasks": "sst2,mrpc", "clients-per-task": 1, "max-samples-per-client": 16}
    values |= {"model": tiny_models["bert"], "batch-size": 8, "max-length": 32, "local-epochs-by-task": "mrpc:3"}
    cfg = Config.from_run_config(values)
    assert (cfg.epochs_for("sst2"), cfg.epochs_for("mrpc")) == (1, 3)
    assert [len(batch_plan(cfg, i, 1)) for i in (0, 1)] == [2, 6]  # split learning steps through the same plan
    adapter, head = (to_numpy(s) for s in initial_state(cfg))
    assert [run_train(cfg, i, 1, adapter, head)[2].steps for i in (0, 1)] == [2, 6]
    with pytest.raises(ConfigError, match="task:epochs pairs"):
        Config.from_run_config(values | {"local-epochs-by-task": "mrpc:0"})
