"""Where a task runs: one parser for the ``device`` settings of every task (sweep points, text-to-image)."""

from __future__ import annotations

import torch

from fingerprint_lm.errors import ConfigError


def resolve_device(name: str | None, setting: str = "device") -> torch.device:
    """``auto`` (CUDA when there is one, else CPU), ``cpu``, ``cuda`` or ``cuda:N``.

    ``setting`` names the config key in error messages (e.g. ``sweep.device``).
    """
    name = str(name or "auto")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError) as exc:
        raise ConfigError(f"{setting} must be auto, cpu, cuda or cuda:N, got {name!r}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{setting}={name} but CUDA is not available here (use {setting}=auto or cpu)")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"{setting} must be auto, cpu, cuda or cuda:N, got {name!r}")
    return device
