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

import json
import math
import os
from pathlib import Path
from typing import Any

from fingerprint_lm.errors import DataError
from fingerprint_lm.report.runs import RunRecord
from fingerprint_lm.report.text_tables import csv_text, markdown_lines
from fingerprint_lm.storage import atomic_files

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
    return csv_text(columns, rows, _csv_cell)


def markdown_table(columns: list[str], rows: list[dict]) -> str:
    return "\n".join(markdown_lines(columns, rows, _md_cell)) + "\n"


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
    with atomic_files(output_dir) as staging:  # everything is written before a previous report's files are replaced
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
    table = markdown_table(["run", *config_columns, *metric_columns], rows)
    return [output_dir / name for name in names], table
