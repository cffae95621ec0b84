"""Errors a user can cause. The entry point prints them as one line and exits non-zero."""

from __future__ import annotations

import dataclasses
import inspect
import math
import numbers
import sys
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

SettingsT = TypeVar("SettingsT")


class FingerprintError(Exception):
    """Base class: bad input, bad config or a state the user can fix. Never a bug."""


class ConfigError(FingerprintError):
    """A configuration value is invalid (e.g. fingerprint length 0)."""


class DataError(FingerprintError):
    """Input data is missing, unreadable or of the wrong shape."""


class CheckpointError(FingerprintError):
    """A checkpoint or copy file is missing, truncated or does not match its hash."""


class RegistryError(FingerprintError):
    """Unknown or duplicate user, code length mismatch, or other registry misuse."""


def exit_on_user_error(function: Callable[[], Any]) -> Any:
    """Call ``function``; a :class:`FingerprintError` becomes one ``error: ...`` line on stderr and
    exit code 2 (console entry points and the scripts in ``experiments/``)."""
    try:
        return function()
    except FingerprintError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


def hydra_error_line(exc: Exception) -> str:
    """One line for a Hydra composition or override error, naming the valid choices where Hydra
    knows them (an unknown experiment or group option)."""
    from hydra.errors import MissingConfigException, OverrideParseException

    if isinstance(exc, MissingConfigException) and exc.missing_cfg_file and exc.options:
        group, _, option = str(exc.missing_cfg_file).rpartition("/")
        return f"unknown {group} '{option}' (choose one of: {', '.join(exc.options)})"
    if isinstance(exc, OverrideParseException):
        reason = exc.message.splitlines()[0]
        return (
            f"cannot parse the override '{exc.override}': {reason} "
            "(syntax: https://hydra.cc/docs/advanced/override_grammar/basic/)"
        )
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if exc.__cause__ is not None:  # e.g. "Key 'x' is not in struct" behind "Could not override 'x'"
        lines.append(f"({str(exc.__cause__).splitlines()[0].strip()})")
    return " ".join(lines)


# -- the range checks every layer shares ----------------------------------------------------------
def check_int(name: str, value: object, minimum: int = 1, error: type[FingerprintError] | None = None) -> int:
    """``int(value)`` when it is an integer (Python's or numpy's) >= ``minimum``; otherwise
    ``error`` (ConfigError unless given: DataError where the number comes from data, not a setting)."""
    # bool is an int subclass: `resolution: true` in a YAML file must not pass as 1.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:  # numpy ints pass
        kind = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise (error or ConfigError)(f"{name} must be {kind}, got {value!r}")
    return int(value)


def check_probability(name: str, value: object) -> float:
    """``float(value)`` when it lies in the open interval (0, 1) (a false-accusation rate)."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        number = float("nan")
    if isinstance(value, bool) or not 0.0 < number < 1.0:
        raise ConfigError(f"{name} must lie in (0, 1), got {value}")
    return number


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    """``value`` when it is one of ``choices``; ConfigError naming them otherwise."""
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def check_float(name: str, value: object, minimum: float | None = None, maximum: float | None = None,
                above: float | None = None) -> float:
    """``float(value)`` when it is a finite number in range (``minimum <= value <= maximum``,
    ``value > above``); ConfigError otherwise (a bool, a string or NaN included)."""
    number = float(value) if isinstance(value, int | float) and not isinstance(value, bool) else math.nan
    if (not math.isfinite(number) or (minimum is not None and number < minimum)
            or (maximum is not None and number > maximum) or (above is not None and number <= above)):
        bounds = [f">= {minimum:g}" if minimum is not None else "", f"<= {maximum:g}" if maximum is not None else "",
                  f"> {above:g}" if above is not None else ""]
        wanted = " and ".join(b for b in bounds if b)
        raise ConfigError(f"{name} must be a finite number {wanted}, got {value!r}")
    return number


def check_keys(where: str, values: Mapping, known: Iterable[str]) -> None:
    """ConfigError naming the keys of ``values`` outside ``known`` (a typo'd setting), and the
    known ones, instead of a TypeError from deep inside a constructor."""
    known = list(known)
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"{where} has no setting {', '.join(map(repr, unknown))} (known: {', '.join(known)})")


def keyword_names(function: Callable, exclude: Iterable[str] = ()) -> list[str]:
    """The keyword parameters ``function`` (or a class's constructor) accepts, less ``exclude``."""
    skip = {"self", *exclude}
    return [name for name, p in inspect.signature(function).parameters.items()
            if name not in skip and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def settings_from(build: Callable[..., SettingsT], values: Mapping, where: str,
                  known: Iterable[str] | None = None) -> SettingsT:
    """``build(**values)``, where ``build`` checks ranges and names each argument bare (a settings
    dataclass whose ``__post_init__`` checks, or a check function): a key outside ``known`` (default:
    the dataclass's fields, or the function's keywords) is one ConfigError naming the known ones, a
    value out of range one naming it under ``where`` (``method.train.lr must be ...``)."""
    if known is None:
        known = [f.name for f in dataclasses.fields(build)] if dataclasses.is_dataclass(build) else keyword_names(build)
    check_keys(where, values, known)
    try:
        return build(**values)
    except ConfigError as exc:
        raise ConfigError(f"{where}.{exc}") from None
