"""``task=report``: compare runs side by side (:mod:`fingerprint_lm.report.compare`) from local
folders (``report.runs``) and/or the W&B API (``report.wandb_path``); prints the table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from fingerprint_lm.config_schema import read_settings
from fingerprint_lm.errors import ConfigError
from fingerprint_lm.report.compare import write_report
from fingerprint_lm.report.runs import RunRecord, collect_local_runs, collect_wandb_api_runs
from fingerprint_lm.tasks.wrapper import Task, TaskContext


def _string_list(name: str, value: Any, allow_none: bool = False) -> list[str] | None:
    if value is None and allow_none:
        return None
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{name} must be a list of strings, got {value!r}")
    return value


def run_report(cfg: DictConfig, context: TaskContext) -> dict[str, Any]:
    """``task=report``: collect ``report.runs`` and/or ``report.wandb_path``, write the comparison to
    ``report.output_dir``, print the table; returns ``{"runs", "output_dir", "files"}``."""
    settings = read_settings(cfg, "report")  # max_runs, output_dir and filters checked there
    paths = _string_list("report.runs", settings.runs or [])
    wandb_path = settings.wandb_path
    if not paths and not wandb_path:
        raise ConfigError("nothing to compare: set report.runs=[DIR,...] or report.wandb_path=entity/project")

    runs: list[RunRecord] = []
    for path in paths:
        runs.extend(collect_local_runs(path))
    if wandb_path:
        runs.extend(collect_wandb_api_runs(wandb_path, settings.group, settings.filters or {}, settings.max_runs))
    files, table = write_report(
        runs,
        settings.output_dir,
        metrics=_string_list("report.metrics", settings.metrics, allow_none=True),
        config_keys=_string_list("report.config_keys", settings.config_keys, allow_none=True),
        ignore_prefixes=tuple(_string_list("report.ignore_config", settings.ignore_config or [])),
        quality_metric=settings.quality_metric or "psnr",
    )
    print(table, end="")
    print(f"report: {len(runs)} runs -> {Path(settings.output_dir)} ({', '.join(p.name for p in files)})")
    return {"runs": len(runs), "output_dir": str(settings.output_dir), "files": [str(p) for p in files]}


TASK = Task("report", run_report)
