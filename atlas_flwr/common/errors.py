"""One-line errors for bad input: each names the value and what is allowed."""

from __future__ import annotations

from typing import Any


class AtlasError(Exception):
    """Base of the errors a user can fix; printed as one line, without traceback."""


class ConfigError(AtlasError, ValueError):
    """A run-config key with a value that is not allowed."""

    def __init__(self, key: str, value: Any, allowed: str) -> None:
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"run-config '{key}' = {value!r} is not allowed: expected {allowed}")


class DataError(AtlasError, ValueError):
    """A data set, split or directory that cannot be used."""


class ModelError(AtlasError, ValueError):
    """A model alias, directory or architecture that cannot be used."""
