"""Nothing half-written after a bad sweep value: Hydra creates a multirun's directory (and its
``multirun.yaml``) before it composes the first job's config, so a sweep stopped by, say, an
unknown group option would leave an empty sweep behind. :class:`RecordSweepDir` (a Hydra callback,
``conf/hydra/default.yaml``) remembers the directory; the entry point calls
:func:`remove_unstarted_sweeps` when it reports such an error."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

STARTED_SWEEPS: list[Path] = []


class RecordSweepDir(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        STARTED_SWEEPS.append(Path(str(OmegaConf.select(config, "hydra.sweep.dir"))))


def remove_unstarted_sweeps() -> None:
    """Delete each recorded sweep directory that holds nothing but Hydra's ``multirun.yaml``
    (a sweep with a finished or started point keeps everything)."""
    for sweep_dir in STARTED_SWEEPS:
        if sweep_dir.is_dir() and all(p.name == "multirun.yaml" for p in sweep_dir.iterdir()):
            shutil.rmtree(sweep_dir)
    STARTED_SWEEPS.clear()
