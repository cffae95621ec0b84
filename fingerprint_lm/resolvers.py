"""OmegaConf resolvers the configs use; registered when the package is imported (``__init__``).

They are registered at import time, not inside the entry point, because configs are also composed
by tests and scripts (``hydra.compose``) that import the package but never run ``__main__``.
Interpolations resolve lazily, so the registration only has to happen before a value is read.
"""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import OmegaConf

# WANDB_MODE values under which nothing may be sent to the W&B server.
_OFFLINE_MODES = ("offline", "dryrun", "disabled")


def wandb_offline() -> bool:
    """``${fingerprint_lm.wandb_offline:}``: True unless W&B can and should go online.

    Online iff ``WANDB_API_KEY`` is set and ``WANDB_MODE`` is not offline/dryrun/disabled;
    ``WANDB_MODE=online`` also means online (a key stored by ``wandb login`` in ~/.netrc). Read at
    resolution time, so the environment of the process that builds the logger decides.
    """
    mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if mode in _OFFLINE_MODES:
        return True
    if mode == "online":
        return False
    return not os.environ.get("WANDB_API_KEY", "").strip()


def launch_dir() -> str:
    """``${fingerprint_lm.launch_dir:}``: the directory the command was started in.

    Inside a job this is Hydra's ``runtime.cwd`` (right even if ``hydra.job.chdir`` was turned on);
    before any job exists (a sweeper resolving ``hydra.sweep.dir``, ``--cfg``, ``hydra.compose``)
    HydraConfig is not set, and the process has not changed directory, so it is the current one.
    """
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return str(HydraConfig.get().runtime.cwd)
    return os.getcwd()


def package_dir() -> str:
    """``${fingerprint_lm.package_dir:}``: the installed ``fingerprint_lm`` package (its assets)."""
    return str(Path(__file__).resolve().parent)


def register_resolvers() -> None:
    """Register this package's resolvers (idempotent: importing twice is harmless)."""
    OmegaConf.register_new_resolver("fingerprint_lm.wandb_offline", wandb_offline, replace=True)
    OmegaConf.register_new_resolver("fingerprint_lm.launch_dir", launch_dir, replace=True)
    OmegaConf.register_new_resolver("fingerprint_lm.package_dir", package_dir, replace=True)
