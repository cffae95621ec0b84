"""Checks of data settings shared by the DataModule and the streaming datasets."""

from __future__ import annotations

from fingerprint_lm.errors import ConfigError


def check_int(name: str, value: object, minimum: int = 1) -> None:
    """Raise ``ConfigError`` unless ``value`` is an int >= ``minimum``."""
    # bool is an int subclass: `resolution: true` in a YAML file must not pass as 1.
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ConfigError(f"{name} must be {kind}, got {value!r}")
