"""Sweep summaries: every ``*/metrics.json`` of a sweep dir -> ``summary.csv``, ``summary.md``, plots.

Deterministic: rows are sorted by their grid keys and numbers are written with fixed precision, so
the same metrics files give byte-identical summary files (plots carry no timestamp).
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from fingerprint_lm.errors import DataError
from fingerprint_lm.models.act import ACT_TYPES

COLUMNS: tuple[str, ...] = (
    "fingerprint_bits",
    "act",
    "attack",
    "attack_strength",
    "colluders",
    "case",
    "n_images",
    "bit_acc",
    "bit_acc_min",
    "bit_acc_max",
    "attribution_acc",
    "tpr_at_fpr1e-6",
    "false_positives",
    "tracing_caught",
    "tracing_innocents_accused",
    "psnr",
    "ssim",
    "fid_proxy",
    "fid_proxy_base",
)
# The readable table: fewer columns.
MARKDOWN_COLUMNS: tuple[str, ...] = (
    "act",
    "attack",
    "attack_strength",
    "colluders",
    "bit_acc",
    "attribution_acc",
    "tpr_at_fpr1e-6",
    "tracing_caught",
    "tracing_innocents_accused",
    "psnr",
    "ssim",
    "fid_proxy",
    "fid_proxy_base",
)
SUMMARY_FILES: tuple[str, ...] = (
    "summary.csv",
    "summary.md",
    "collusion_psnr.png",
    "collusion_fid_proxy.png",
    "bit_acc_vs_strength.png",
)
_MERGE_PLOTS = ("average", "aligned_average")


def collect_points(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """The metrics of every point (``<sweep dir>/*/metrics.json``), sorted by grid keys."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise DataError(f"no sweep directory at {sweep_dir}")
    rows = []
    for path in sorted(sweep_dir.glob("*/metrics.json")):
        try:
            rows.append(json.loads(path.read_text()))
        except json.JSONDecodeError as exc:
            raise DataError(f"corrupt {path}: {exc}") from exc
    return sorted(rows, key=_sort_key)


def _sort_key(row: dict) -> tuple:
    act = row.get("act")
    strength = row.get("attack_strength")
    return (
        row.get("fingerprint_bits") or 0,
        ACT_TYPES.index(act) if act in ACT_TYPES else len(ACT_TYPES),
        str(act),
        str(row.get("attack")),
        -math.inf if strength is None else float(strength),
        row.get("colluders") or 0,
        str(row.get("case")),
    )


def _cell(value: Any, digits: int = 4) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.{digits}f}" if not value.is_integer() or abs(value) >= 1e15 else f"{value:g}"
    return str(value)


def summary_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(COLUMNS)
    for row in rows:
        writer.writerow([_cell(row.get(c), 6) for c in COLUMNS])
    return buffer.getvalue()


def summary_markdown(rows: list[dict], title: str = "Collusion sweep") -> str:
    lines = [
        f"# {title}",
        "",
        f"{len(rows)} points. fid_proxy is a proxy (a small feature net trained on the "
        "procedural images), not FID; compare it with fid_proxy_base (base decoder).",
        "",
    ]
    lines.append("| " + " | ".join(MARKDOWN_COLUMNS) + " |")
    lines.append("|" + "|".join("---" for _ in MARKDOWN_COLUMNS) + "|")
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c), 3) for c in MARKDOWN_COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def _plot_collusion(rows: list[dict], metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(_MERGE_PLOTS), figsize=(9, 3.4), sharey=True)
    for ax, merge in zip(axes, _MERGE_PLOTS, strict=True):
        for act in ACT_TYPES:
            points = sorted(
                (r["colluders"], r[metric])
                for r in rows
                if r.get("act") == act
                and r.get(metric) is not None
                and (r.get("attack") == merge or (r.get("attack") == "none" and r.get("colluders") == 1))
            )
            if points:
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", lw=1, label=f"ACT {act}")
        ax.set(title=merge, xlabel="colluders", ylabel=metric)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="center right", fontsize=8)
    fig.tight_layout(rect=(0, 0, 0.85, 1))
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)


def _plot_strength(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attacks = sorted(
        {r["attack"] for r in rows if r.get("attack_strength") is not None and r.get("colluders") == 1}
    )
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for attack in attacks:
        points = sorted(
            (r["attack_strength"], r["bit_acc"])
            for r in rows
            if r.get("attack") == attack and r.get("attack_strength") is not None and r.get("act") == "none"
        ) or sorted(
            (r["attack_strength"], r["bit_acc"])
            for r in rows
            if r.get("attack") == attack and r.get("attack_strength") is not None
        )
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", lw=1, label=attack)
    ax.set(
        xlabel="attack strength (attack's own unit)", ylabel="bit accuracy", ylim=(0.4, 1.02), xscale="symlog"
    )
    ax.axhline(0.5, color="grey", ls="--", lw=0.8)
    if attacks:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)


def write_summary(sweep_dir: str | Path) -> list[Path]:
    """Write :data:`SUMMARY_FILES` into ``sweep_dir``; returns their paths."""
    sweep_dir = Path(sweep_dir)
    rows = collect_points(sweep_dir)
    if not rows:
        raise DataError(f"no */metrics.json under {sweep_dir}: nothing to summarize")
    paths = [sweep_dir / name for name in SUMMARY_FILES]
    paths[0].write_text(summary_csv(rows))
    paths[1].write_text(summary_markdown(rows, f"Collusion sweep {sweep_dir.name}"))
    _plot_collusion(rows, "psnr", paths[2])
    _plot_collusion(rows, "fid_proxy", paths[3])
    _plot_strength(rows, paths[4])
    return paths
