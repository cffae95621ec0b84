"""Nothing half-written after a failed command.

- A bad sweep value: Hydra creates a multirun's directory (and its ``multirun.yaml``) before it
  composes the first job's config, so a sweep stopped by, say, an unknown group option would leave
  an empty sweep behind. :class:`RecordSweepDir` (a Hydra callback, ``conf/hydra/default.yaml``)
  remembers the directory; the entry point calls :func:`remove_unstarted_sweeps` when it reports
  such an error.
- A task that stops with a user error (a missing secret, an unreadable image folder): Hydra has
  already made the job's directory (``.hydra/`` and the job's log). :func:`remove_bare_job_dir`
  deletes it when the task wrote nothing else into it, and the empty folders above it up to
  ``outputs/``."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

# (sweep dir, log dir): a sweep dir outside the log dir loses no folder above it
STARTED_SWEEPS: list[tuple[Path, Path]] = []


class RecordSweepDir(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        STARTED_SWEEPS.append((Path(str(OmegaConf.select(config, "hydra.sweep.dir"))),
                               Path(str(config.paths.log_dir))))


def remove_unstarted_sweeps() -> None:
    """Delete each recorded sweep directory that holds nothing but Hydra's ``multirun.yaml`` (a
    sweep with a finished or started point keeps everything), then the folders it leaves empty up
    to its log dir (``outputs/multiruns``, ``outputs``), when it lies inside that log dir."""
    for sweep_dir, log_dir in STARTED_SWEEPS:
        if sweep_dir.is_dir() and all(p.name == "multirun.yaml" for p in sweep_dir.iterdir()):
            shutil.rmtree(sweep_dir)
            _remove_empty_folders_up_to(sweep_dir, log_dir)
    STARTED_SWEEPS.clear()


def _remove_empty_folders_up_to(path: Path, log_dir: Path) -> None:
    """Remove every empty folder above ``path`` up to ``log_dir`` included, stopping at the first
    folder that holds anything; nothing when ``path`` is not inside ``log_dir``."""
    path, log_dir = path.resolve(), log_dir.resolve()
    if log_dir not in path.parents:
        return
    for folder in path.parents:
        if folder == log_dir.parent:
            break
        if not folder.is_dir():
            continue
        if any(folder.iterdir()):
            break
        folder.rmdir()


def _is_bare_job_dir(job_dir: Path) -> bool:
    """Only what Hydra writes for every job: the ``.hydra/`` folder and the job's ``*.log``."""
    return all((p.name == ".hydra" and p.is_dir()) or (p.is_file() and p.suffix == ".log") for p in job_dir.iterdir())


def remove_bare_job_dir(job_dir: Path, log_dir: Path) -> None:
    """After a failed task: remove ``job_dir`` if the task wrote nothing into it, then an unstarted
    sweep around it and every folder left empty between it and ``log_dir`` (``log_dir`` included:
    a first command that fails leaves no ``outputs/``). A job that wrote anything keeps it all."""
    job_dir, log_dir = job_dir.resolve(), log_dir.resolve()
    if not job_dir.is_dir() or not _is_bare_job_dir(job_dir) or log_dir not in job_dir.parents:
        return
    shutil.rmtree(job_dir)
    remove_unstarted_sweeps()
    _remove_empty_folders_up_to(job_dir, log_dir)  # skips the unstarted sweep just removed
