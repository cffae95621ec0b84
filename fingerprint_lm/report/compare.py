"""``task=report``: compare runs side by side -> ``comparison.csv``, ``comparison.md`` and plots.

Runs come from local folders (``report.runs``) or from the W&B API (``report.wandb_path``). A local
folder may be

- a run directory holding ``metrics.json`` (``task=train`` or one sweep point); its config is the
  ``.hydra/config.yaml`` Hydra writes beside it (unresolved, so path interpolations compare equal);
- a sweep directory: every ``*/metrics.json`` below it is one run;
- a W&B run directory (``wandb/offline-run-*`` or ``wandb/run-*``), or a ``wandb/`` directory
  holding several. The summary and config are read from ``files/wandb-summary.json`` and
  ``files/config.yaml`` where the library wrote them, otherwise replayed from the run's
  transaction log ``run-<id>.wandb`` (offline runs of recent wandb versions write only that log).

One row per run. Columns: the run's name and source, the config keys whose values differ between
runs (or ``report.config_keys``), then ``report.metrics``. A metric ``bit_acc`` is found under that
key or under a logged ``stage/bit_acc`` (``eval/``, ``sweep/``, ... in :data:`STAGE_PREFERENCE`).
Every output file is written to a temporary directory first and moved into ``report.output_dir``
only when all of them exist, so an error never leaves a half-written report.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf

from fingerprint_lm.errors import ConfigError, DataError

# Where a metric logged as ``<stage>/<name>`` is looked up first when ``report.metrics`` says ``name``.
STAGE_PREFERENCE: tuple[str, ...] = ("eval", "sweep", "test", "val", "train")
# The metric columns unless ``report.metrics`` says otherwise (conf/report/default.yaml repeats them).
DEFAULT_METRICS: tuple[str, ...] = (
    "bit_acc",
    "attribution_acc",
    "psnr",
    "ssim",
    "fid_proxy",
    "train_seconds",
)
SCATTER_FILE = "quality_vs_bit_acc.png"
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


# -- W&B transaction logs (the .wandb file an offline run writes) ---------------------------------
# The file is W&B's 7-byte header (":W&B", magic 0xBEE1, version 0) followed by LevelDB-log framed
# chunks: 32 KiB blocks, each chunk a 7-byte header (crc32c, length, type) and its payload; a
# record split across blocks is FIRST + MIDDLE* + LAST. Each record is a protobuf ``Record``.
_LOG_IDENT = b":W&B"
_LOG_MAGIC = 0xBEE1
_LOG_VERSION = 0
_LOG_BLOCK = 32 * 1024
_CHUNK_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _log_payloads(path: Path) -> list[bytes]:
    raw = path.read_bytes()
    if len(raw) < 7 or raw[:4] != _LOG_IDENT:
        raise DataError(f"{path} is not a W&B transaction log")
    magic, version = struct.unpack("<HB", raw[4:7])
    if magic != _LOG_MAGIC or version != _LOG_VERSION:
        raise DataError(f"{path}: unsupported W&B log format (magic {magic:#x}, version {version})")
    payloads, pending, pos = [], None, 7
    while True:
        room = _LOG_BLOCK - pos % _LOG_BLOCK
        if room < _CHUNK_HEADER:  # a block's tail too short for a header is padding
            pos += room
            continue
        if pos + _CHUNK_HEADER > len(raw):
            break
        _crc, length, kind = struct.unpack("<IHB", raw[pos : pos + _CHUNK_HEADER])
        end = pos + _CHUNK_HEADER + length
        if kind == 0 or end > len(raw):  # zero fill or a run killed mid-write: keep what came before
            break
        chunk = raw[pos + _CHUNK_HEADER : end]
        pos = end
        if kind == _FULL:
            payloads.append(chunk)
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE and pending is not None:
            pending += chunk
        elif kind == _LAST and pending is not None:
            payloads.append(pending + chunk)
            pending = None
    return payloads


def _apply_items(target: dict, items, remove: bool = False) -> None:
    """Replay W&B summary/config items (``key`` or ``nested_key`` path, ``value_json``)."""
    for item in items:
        keys = list(item.nested_key) or [item.key]
        node = target
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                break
        else:
            if remove:
                node.pop(keys[-1], None)
            else:
                node[keys[-1]] = json.loads(item.value_json)


def read_wandb_transaction_log(path: str | Path) -> dict[str, Any]:
    """Replay a run's ``.wandb`` log: ``{"run_id", "name", "group", "config", "summary"}``."""
    try:
        from google.protobuf.message import DecodeError
        from wandb.proto import wandb_internal_pb2
    except ImportError as exc:  # the record schema ships with wandb
        raise DataError(f"reading {path} needs the wandb package: {exc}") from exc

    path = Path(path)
    state: dict[str, Any] = {"run_id": None, "name": None, "group": None, "config": {}, "summary": {}}
    for payload in _log_payloads(path):
        record = wandb_internal_pb2.Record()
        try:
            record.ParseFromString(payload)
        except DecodeError as exc:
            raise DataError(f"corrupt record in {path}: {exc}") from exc
        kind = record.WhichOneof("record_type")
        if kind == "run":
            state["run_id"] = record.run.run_id or state["run_id"]
            state["name"] = record.run.display_name or state["name"]
            state["group"] = record.run.run_group or state["group"]
            _apply_items(state["config"], record.run.config.update)
            _apply_items(state["summary"], record.run.summary.update)
        elif kind == "config":
            _apply_items(state["config"], record.config.update)
            _apply_items(state["config"], record.config.remove, remove=True)
        elif kind == "summary":
            _apply_items(state["summary"], record.summary.update)
            _apply_items(state["summary"], record.summary.remove, remove=True)
    return state


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


# -- the table ------------------------------------------------------------------------------------
def _comparable(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def differing_config_keys(runs: list[RunRecord], ignore_prefixes: tuple[str, ...] = ()) -> list[str]:
    """Config keys with at least two distinct values among the runs that have them, sorted.

    A key only some runs have (an experiment's extra settings, W&B's group) is shown only when
    those runs disagree on it: a value with nothing to compare against explains no difference.
    """
    values: dict[str, set[str]] = {}
    for run in runs:
        for key, value in run.config.items():
            if any(key == p or key.startswith(p + ".") for p in ignore_prefixes):
                continue
            values.setdefault(key, set()).add(_comparable(value))
    return sorted(key for key, seen in values.items() if len(seen) > 1)


def metric_value(run: RunRecord, metric: str) -> float | None:
    """``metric`` from the run: the exact key, else ``<stage>/<metric>`` by :data:`STAGE_PREFERENCE`."""
    if metric in run.metrics:
        return run.metrics[metric]
    staged = {
        key.rsplit("/", 1)[0]: value
        for key, value in run.metrics.items()
        if "/" in key and key.rsplit("/", 1)[1] == metric
    }
    for stage in STAGE_PREFERENCE:
        if stage in staged:
            return staged[stage]
    return staged[min(staged)] if staged else None


def _unique_names(runs: list[RunRecord]) -> None:
    """Local runs are named by their path below the folders' common parent; clashes get a suffix."""
    local = [r for r in runs if r.local]
    if len(local) > 1:
        common = Path(os.path.commonpath([str(Path(r.source).resolve()) for r in local]))
        for run in local:
            relative = Path(run.source).resolve().relative_to(common)
            run.name = str(relative) if str(relative) != "." else run.name
    seen: dict[str, int] = {}
    for run in runs:
        seen[run.name] = seen.get(run.name, 0) + 1
        if seen[run.name] > 1:
            run.name = f"{run.name} ({seen[run.name]})"


def build_table(
    runs: list[RunRecord],
    metrics: list[str] | tuple[str, ...] | None,
    config_keys: list[str] | None,
    ignore_prefixes: tuple[str, ...] = (),
) -> tuple[list[str], list[str], list[dict[str, Any]]]:
    """Returns (config columns, metric columns, rows). Metrics no run has are dropped; ``None``
    ``metrics`` means every numeric metric some run has."""
    for run in runs:
        if not run.metrics:
            raise DataError(f"run {run.source} has no numeric metrics")
    if metrics is None:
        metrics = sorted({key for run in runs for key in run.metrics})
    metric_columns = [m for m in metrics if any(metric_value(run, m) is not None for run in runs)]
    if not metric_columns:
        available = sorted({key for run in runs for key in run.metrics})
        raise DataError(
            f"none of report.metrics={list(metrics)} is in any run; available: {', '.join(available[:30])}"
        )
    config_columns = (
        list(config_keys) if config_keys is not None else differing_config_keys(runs, ignore_prefixes)
    )
    rows = []
    for run in runs:
        row: dict[str, Any] = {"run": run.name, "source": run.source}
        row.update({key: run.config.get(key) for key in config_columns})
        row.update({m: metric_value(run, m) for m in metric_columns})
        rows.append(row)
    return config_columns, metric_columns, rows


def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return repr(value)  # shortest text that reads back as the same float
    if isinstance(value, list | dict):
        return json.dumps(value, sort_keys=True)
    return str(value)


def _md_cell(value: Any) -> str:
    if isinstance(value, float) and math.isfinite(value):
        text = f"{value:.0f}" if abs(value) >= 1e4 else f"{value:.4g}"
    else:
        text = _csv_cell(value)
    return text.replace("|", "\\|")


def comparison_csv(columns: list[str], rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([_csv_cell(row.get(c)) for c in columns])
    return buffer.getvalue()


def markdown_table(columns: list[str], rows: list[dict]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(_md_cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def comparison_markdown(config_columns: list[str], metric_columns: list[str], rows: list[dict]) -> str:
    columns = ["run", *config_columns, *metric_columns]
    sources = "\n".join(f"- {row['run']}: {row['source']}" for row in rows)
    note = (
        f"{len(rows)} runs. Config columns: the keys whose values differ between runs"
        f"{' (none differ)' if not config_columns else ''}. fid_proxy is a proxy (a small feature "
        "net trained on the procedural images), not FID."
    )
    return f"# Run comparison\n\n{note}\n\n{markdown_table(columns, rows)}\nSources:\n\n{sources}\n"


# -- plots ----------------------------------------------------------------------------------------
def _safe_name(metric: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in metric)


def _plot_bars(rows: list[dict], metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [(row["run"], row[metric]) for row in rows if row.get(metric) is not None]
    fig, ax = plt.subplots(figsize=(6.5, 1.4 + 0.35 * len(points)))
    ax.barh(range(len(points)), [p[1] for p in points], color="tab:blue")
    ax.set_yticks(range(len(points)), [p[0] for p in points], fontsize=7)
    ax.invert_yaxis()  # first run on top, as in the table
    ax.set(xlabel=metric, title=f"{metric} per run")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)


def _plot_scatter(rows: list[dict], quality_metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [
        (row["bit_acc"], row[quality_metric], row["run"])
        for row in rows
        if row.get("bit_acc") is not None and row.get(quality_metric) is not None
    ]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([p[0] for p in points], [p[1] for p in points], color="tab:orange")
    for x, y, name in points:
        ax.annotate(name, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set(xlabel="bit accuracy", ylabel=quality_metric, title=f"{quality_metric} vs bit accuracy")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)


def write_report(
    runs: list[RunRecord],
    output_dir: str | Path,
    metrics: list[str] | tuple[str, ...] | None = DEFAULT_METRICS,
    config_keys: list[str] | None = None,
    ignore_prefixes: tuple[str, ...] = ("paths", "hydra", "_wandb"),
    quality_metric: str = "psnr",
) -> tuple[list[Path], str]:
    """Write the comparison into ``output_dir``; returns (paths written, the markdown table).

    Parameters:
        runs: the runs, in table order.
        metrics: metric columns (names or ``stage/name``); None: all numeric metrics.
        config_keys: config columns; None: the keys whose values differ between runs.
        ignore_prefixes: config key prefixes never shown by the automatic choice.
        quality_metric: the y axis of the quality-vs-bit-accuracy scatter.
    """
    if not runs:
        raise DataError("no runs to compare")
    _unique_names(runs)
    config_columns, metric_columns, rows = build_table(runs, metrics, config_keys, ignore_prefixes)
    for key in ("bit_acc", quality_metric):  # the scatter's axes, even when not table columns
        if key not in metric_columns:
            for run, row in zip(runs, rows, strict=True):
                row[key] = metric_value(run, key)
    columns = ["run", "source", *config_columns, *metric_columns]
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".report.", dir=output_dir))
    try:
        files = {
            "comparison.csv": comparison_csv(columns, rows),
            "comparison.md": comparison_markdown(config_columns, metric_columns, rows),
        }
        for name, text in files.items():
            (staging / name).write_text(text)
        names = list(files)
        for metric in metric_columns:
            name = f"bar_{_safe_name(metric)}.png"
            _plot_bars(rows, metric, staging / name)
            names.append(name)
        if any(row.get("bit_acc") is not None and row.get(quality_metric) is not None for row in rows):
            _plot_scatter(rows, quality_metric, staging / SCATTER_FILE)
            names.append(SCATTER_FILE)
        for name in names:  # everything exists: now replace the previous report's files
            os.replace(staging / name, output_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    table = markdown_table(["run", *config_columns, *metric_columns], rows)
    return [output_dir / name for name in names], table


# -- the Hydra task -------------------------------------------------------------------------------
def _string_list(name: str, value: Any, allow_none: bool = False) -> list[str] | None:
    if value is None and allow_none:
        return None
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{name} must be a list of strings, got {value!r}")
    return value


def run_report(cfg: DictConfig) -> dict[str, Any]:
    """``task=report``: collect ``report.runs`` and/or ``report.wandb_path``, write the comparison to
    ``report.output_dir``, print the table; returns ``{"runs", "output_dir", "files"}``."""
    settings = OmegaConf.to_container(cfg.report, resolve=True)
    paths = _string_list("report.runs", settings.get("runs") or [])
    wandb_path = settings.get("wandb_path")
    if not paths and not wandb_path:
        raise ConfigError("nothing to compare: set report.runs=[DIR,...] or report.wandb_path=entity/project")
    max_runs = settings.get("max_runs", 200)
    if not isinstance(max_runs, int) or isinstance(max_runs, bool) or max_runs <= 0:
        raise ConfigError(f"report.max_runs must be a positive integer, got {max_runs!r}")
    if not isinstance(settings.get("output_dir"), str) or not settings["output_dir"]:
        raise ConfigError(f"report.output_dir must be a folder path, got {settings.get('output_dir')!r}")
    filters = settings.get("filters") or {}
    if not isinstance(filters, dict):
        raise ConfigError(f"report.filters must be a mapping, got {filters!r}")

    runs: list[RunRecord] = []
    for path in paths:
        runs.extend(collect_local_runs(path))
    if wandb_path:
        runs.extend(collect_wandb_api_runs(wandb_path, settings.get("group"), filters, max_runs))
    files, table = write_report(
        runs,
        settings["output_dir"],
        metrics=_string_list("report.metrics", settings.get("metrics"), allow_none=True),
        config_keys=_string_list("report.config_keys", settings.get("config_keys"), allow_none=True),
        ignore_prefixes=tuple(_string_list("report.ignore_config", settings.get("ignore_config") or [])),
        quality_metric=str(settings.get("quality_metric") or "psnr"),
    )
    print(table, end="")
    print(f"report: {len(runs)} runs -> {Path(settings['output_dir'])} ({', '.join(p.name for p in files)})")
    return {"runs": len(runs), "output_dir": str(settings["output_dir"]), "files": [str(p) for p in files]}
