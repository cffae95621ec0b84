"""What every task does at its start and end (lightning-hydra-template's ``task_wrapper``).

A :class:`Task` names the function that does the work and where its JSON result goes;
:func:`run_task` checks the top-level keys (``config_schema.RunConfig``), seeds, times
(``task_seconds`` in the JSON), turns Hydra's multi-line instantiation errors into one line, writes
the JSON atomically (on the process that writes outputs), prints the task's summary for people and
closes the W&B run in ``finally``, so a failed
task never leaves one open for the next.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from fingerprint_lm.attacks.cases import ATTACK_TABLES, register_attack
from fingerprint_lm.config_schema import read_run_settings
from fingerprint_lm.errors import ConfigError, FingerprintError
from fingerprint_lm.storage import atomic_write_text

log = logging.getLogger(__name__)


@dataclass
class TaskContext:
    """What a task gets besides the config: its run dir, the loggers it opened (closed by
    :func:`run_task`), and whether it reused an earlier result (then nothing is rewritten)."""

    output_dir: Path
    loggers: list = field(default_factory=list)
    reused: bool = False

    def open_loggers(self, cfg: DictConfig, **overrides) -> list:
        """The ``logger`` group's logger (none for ``logger=none``), opened once per task."""
        if cfg.get("logger") and not self.loggers:
            self.loggers.append(instantiate(cfg.logger, **overrides))
        return self.loggers


@dataclass(frozen=True)
class Task:
    """A command of ``python -m fingerprint_lm task=<name>``."""

    name: str
    body: Callable[[DictConfig, TaskContext], dict[str, Any]]
    json_path: Callable[[DictConfig], Path] | None = None  # where the result is written
    summarize: Callable[[dict[str, Any], Path | None], None] | None = None  # a few lines for people
    sort_keys: bool = False


def run_task(task: Task, cfg: DictConfig) -> dict[str, Any]:
    start = time.perf_counter()
    context = TaskContext(Path(cfg.paths.output_dir))
    os.environ.setdefault("WANDB_SILENT", "true")
    try:
        run_settings = read_run_settings(cfg)  # seed, fingerprint_bits, ...: checked here, once for every task
        L.seed_everything(run_settings.seed, verbose=False)  # torch, numpy and random, as the template's task_wrapper
        register_attacks(cfg)
        result = task.body(cfg, context)
        if not is_global_zero():
            return result  # DDP: rank 0 alone writes a run's outputs
        json_path = task.json_path(cfg) if task.json_path else None
        if json_path is not None and not context.reused:
            # the task's wall time, start to result, beside its figures: runs compare on it too
            result = {**result, "task_seconds": round(time.perf_counter() - start, 3)}
            json_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(json_path, json.dumps(result, indent=2, sort_keys=task.sort_keys))
        if task.summarize is not None:
            task.summarize(result, json_path)
        log.info("task=%s finished in %.1f s", task.name, time.perf_counter() - start)
        return result
    except InstantiationException as exc:
        raise one_line_config_error(exc) from exc
    finally:
        finish_wandb(context.loggers)


def register_attacks(cfg: DictConfig) -> None:
    """The ``attacks`` group (``attacks.<image|model|merge|image_merge>.<name>``: ``_target_``
    configs), each built with ``instantiate`` and registered under its name: the built-in attacks
    the group lists, and any plug-in added to it."""
    seen: dict[str, str] = {}
    for kind in ATTACK_TABLES:
        for name, spec in (OmegaConf.select(cfg, f"attacks.{kind}") or {}).items():
            if str(name) in seen:
                raise ConfigError(
                    f"attack {str(name)!r} is both attacks.{seen[str(name)]} and attacks.{kind}: one name, one attack"
                )
            seen[str(name)] = kind
            register_attack(kind, str(name), instantiate(spec))


def one_line_config_error(exc: InstantiationException) -> FingerprintError:
    """The user's error behind a failed ``instantiate``: a check's own ConfigError as it is, else
    Hydra's message (target, cause, key over several lines) on one line."""
    if isinstance(exc.__cause__, FingerprintError):
        return exc.__cause__
    return ConfigError(" ".join(line.strip() for line in str(exc).splitlines() if line.strip()))


def is_global_zero() -> bool:
    """Whether this process writes a run's outputs: the only process of a single-device run,
    the main process of ``ddp_spawn`` (its ranks are child processes), global rank 0 of
    ``strategy=ddp`` or a SLURM job. Lightning sets this rank from the environment at import
    (``RANK``, ``LOCAL_RANK``, ``SLURM_PROCID``) and again when a DDP strategy starts."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def finish_wandb(loggers) -> None:
    """End the W&B run of a job (if one of ``loggers`` is W&B), so the next job starts its own."""
    if any(type(lg).__name__ == "WandbLogger" for lg in loggers):
        import wandb  # only when a W&B logger ran: wandb's import takes seconds

        wandb.finish()


def flatten(metrics: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a/b": 1}`` (what loggers take)."""
    flat = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
