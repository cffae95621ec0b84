"""The runs ``task=report`` compares: local run folders (``metrics.json`` + Hydra's config), W&B
run folders (summary and config files, or their replayed transaction log) and runs of the W&B API,
each read into one :class:`RunRecord` of flat config keys and numeric metrics."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fingerprint_lm.errors import ConfigError, DataError
from fingerprint_lm.report.wandb_log import read_wandb_transaction_log

WANDB_SUMMARY = Path("files") / "wandb-summary.json"
WANDB_CONFIG = Path("files") / "config.yaml"


@dataclass
class RunRecord:
    """One run to compare: flat ``config`` (dotted keys) and flat numeric ``metrics`` (``/`` keys)."""

    name: str
    source: str
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    local: bool = True  # a folder on this machine (renamed by its path), not a W&B API run


# -- flattening -----------------------------------------------------------------------------------
def flatten_config(node: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts -> ``{"a.b.c": value}``; lists stay values (compared and printed whole)."""
    if not isinstance(node, dict):
        return {prefix: node} if prefix else {}
    flat: dict[str, Any] = {}
    for key, value in node.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            flat.update(flatten_config(value, name))
        else:
            flat[name] = value
    return flat


def numeric_metrics(node: Any, prefix: str = "") -> dict[str, float]:
    """Numbers of a (nested) metrics dict as ``{"eval/psnr": 31.2}``; strings, lists, booleans and
    W&B's private ``_keys`` (``_step``, ``_runtime``, media objects' ``_type``) are left out."""
    flat: dict[str, float] = {}
    if not isinstance(node, dict) or "_type" in node:
        return flat
    for key, value in node.items():
        key = str(key)
        if key.startswith("_"):
            continue
        name = f"{prefix}/{key}" if prefix else key
        if isinstance(value, dict):
            flat.update(numeric_metrics(value, name))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            flat[name] = float(value)
    return flat


def _descriptive_fields(metrics: dict) -> dict[str, Any]:
    """Top-level strings/booleans of a metrics.json (``act``, ``attack``, ``case``): the run's
    config when Hydra's ``.hydra/config.yaml`` is not beside it."""
    return {k: v for k, v in metrics.items() if isinstance(v, str | bool) or v is None}


def _unwrap_wandb_config(config: dict) -> dict:
    """W&B stores config values as ``{"value": v, "desc": ...}`` in files/config.yaml."""
    out = {}
    for key, value in config.items():
        if str(key).startswith("_"):
            continue
        if isinstance(value, dict) and "value" in value and set(value) <= {"value", "desc"}:
            value = value["value"]
        out[key] = value
    return out


# -- local folders --------------------------------------------------------------------------------
def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"corrupt {path}: {exc}") from exc


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise DataError(f"corrupt {path}: {' '.join(str(exc).split())}") from exc


def read_metrics_run(run_dir: Path) -> RunRecord:
    """A run directory with ``metrics.json`` (and, from Hydra, ``.hydra/config.yaml``)."""
    raw = _read_json(run_dir / "metrics.json")
    if not isinstance(raw, dict):
        raise DataError(f"{run_dir / 'metrics.json'} is not a JSON object")
    hydra_config = run_dir / ".hydra" / "config.yaml"
    if hydra_config.is_file():
        config = flatten_config(_read_yaml(hydra_config) or {})
    else:
        config = _descriptive_fields(raw)
    return RunRecord(run_dir.name, str(run_dir), config, numeric_metrics(raw))


def is_wandb_run_dir(path: Path) -> bool:
    return (path / WANDB_SUMMARY).is_file() or any(path.glob("run-*.wandb"))


def read_wandb_run_dir(run_dir: Path) -> RunRecord:
    """A local W&B run directory: summary and config from ``files/`` or from the transaction log."""
    if (run_dir / WANDB_SUMMARY).is_file():
        summary = _read_json(run_dir / WANDB_SUMMARY)
        config = _read_yaml(run_dir / WANDB_CONFIG) if (run_dir / WANDB_CONFIG).is_file() else {}
        group = None
    else:
        logs = sorted(run_dir.glob("run-*.wandb"))
        if not logs:
            raise DataError(f"{run_dir}: no {WANDB_SUMMARY} and no run-*.wandb transaction log")
        replayed = read_wandb_transaction_log(logs[-1])
        summary, config, group = replayed["summary"], replayed["config"], replayed["group"]
    config = flatten_config(_unwrap_wandb_config(config if isinstance(config, dict) else {}))
    if group:
        config["wandb.group"] = group
    return RunRecord(run_dir.name, str(run_dir), config, numeric_metrics(summary))


def collect_local_runs(path: str | Path) -> list[RunRecord]:
    """The runs under one ``report.runs`` entry (see the module docstring for what it may be)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"no run folder at {path}")
    if not path.is_dir():
        raise DataError(f"{path} is not a folder (expected a run, sweep or W&B run directory)")
    if (path / "metrics.json").is_file():
        return [read_metrics_run(path)]
    if is_wandb_run_dir(path):
        return [read_wandb_run_dir(path)]
    children = sorted(p.parent for p in path.glob("*/metrics.json"))
    if children:
        return [read_metrics_run(child) for child in children]
    wandb_runs = sorted(p for p in path.glob("*") if p.is_dir() and is_wandb_run_dir(p))
    if wandb_runs:
        return [read_wandb_run_dir(child) for child in wandb_runs]
    raise DataError(
        f"nothing to compare in {path}: no metrics.json, */metrics.json or W&B run "
        f"({WANDB_SUMMARY} or run-*.wandb)"
    )


# -- the W&B API ----------------------------------------------------------------------------------
def collect_wandb_api_runs(
    wandb_path: str, group: str | None = None, filters: dict | None = None, max_runs: int = 200
) -> list[RunRecord]:
    """Runs of ``entity/project`` from ``wandb.Api()`` (needs ``WANDB_API_KEY``), newest last."""
    if not os.environ.get("WANDB_API_KEY", "").strip():
        raise ConfigError(
            f"report.wandb_path={wandb_path} needs WANDB_API_KEY set (offline: compare local folders "
            "with report.runs=[DIR,...])"
        )
    if not isinstance(wandb_path, str) or wandb_path.count("/") != 1 or "" in wandb_path.split("/"):
        raise ConfigError(f"report.wandb_path must be entity/project, got {wandb_path!r}")
    import wandb

    query = dict(filters or {})
    if group:
        query["group"] = group
    records = []
    try:
        api = wandb.Api(timeout=60)
        for run in api.runs(wandb_path, filters=query or None):
            summary = getattr(run, "summary_metrics", None)
            if summary is None:
                summary = {key: run.summary[key] for key in run.summary.keys()}
            config = flatten_config(_unwrap_wandb_config(dict(run.config or {})))
            if getattr(run, "group", None):
                config["wandb.group"] = run.group
            name = run.name or run.id
            source = getattr(run, "url", None) or f"{wandb_path}/{run.id}"
            records.append(RunRecord(name, source, config, numeric_metrics(dict(summary)), local=False))
            if len(records) >= max_runs:
                break
    except (wandb.errors.Error, ValueError, OSError) as exc:  # requests' errors are OSErrors
        raise DataError(f"W&B API, {wandb_path}: {' '.join(str(exc).split())}") from exc
    if not records:
        raise DataError(f"no W&B runs in {wandb_path}" + (f" matching {query}" if query else ""))
    return records
