"""Errors a user can cause. The entry point prints them as one line and exits non-zero."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any


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
