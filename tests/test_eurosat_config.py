"""The EuroSAT run-config keys: one-line errors, and the population size they set."""

from __future__ import annotations

import pytest

from atlas_flwr.common.config import Config
from atlas_flwr.common.errors import ConfigError


@pytest.mark.parametrize(
    ("key", "value", "allowed"),
    [
        ("workload", "cifar", "one of glue, eurosat"),
        ("precision", "int4", "one of fp32, fp16, int8"),
        ("time-limit-minutes", -1.0, "a number in [0.0"),
        ("eurosat-clients", 0, "an integer >= 1"),
    ],
)
def test_bad_eurosat_values_are_one_line(run_config: dict, key: str, value: object, allowed: str) -> None:
    run_config[key] = value
    with pytest.raises(ConfigError) as info:
        Config.from_run_config(run_config)
    message = str(info.value)
    assert "\n" not in message and f"'{key}'" in message and repr(value) in message and allowed in message


def test_eurosat_population_is_eurosat_clients(run_config: dict) -> None:
    assert Config.from_run_config(run_config).num_clients == 8  # glue: tasks x clients-per-task
    cfg = Config.from_run_config({**run_config, "workload": "eurosat", "eurosat-clients": 10})
    assert cfg.num_clients == 10
