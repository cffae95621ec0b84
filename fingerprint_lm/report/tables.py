"""Sweep summaries: every ``*/metrics.json`` of a sweep dir -> ``summary.csv``, ``summary.md``, plots.

Deterministic: rows are sorted by their grid keys and numbers are written with fixed precision, so
the same metrics files give byte-identical summary files (plots carry no timestamp).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from fingerprint_lm.attacks.cases import attack_kind
from fingerprint_lm.errors import ConfigError, DataError
from fingerprint_lm.models.act import ACT_TYPES
from fingerprint_lm.report.text_tables import csv_text, markdown_lines
from fingerprint_lm.storage import atomic_files

COLUMNS: tuple[str, ...] = (
    "method",
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
    "tardos_caught",
    "tardos_innocents_accused",
    "psnr",
    "ssim",
    "fid_proxy",
    "fid_proxy_base",
    "act_scope",
    "model_source",
    "issue_seconds",  # wall time to make one user's copy (stable_signature: its per-copy training run)
    "screen_pass_rate",  # the colluders' codes were screened (pnm); attribution at fpr x this rate
)
# The readable table: fewer columns.
MARKDOWN_COLUMNS: tuple[str, ...] = (
    "method",
    "fingerprint_bits",
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


def method_of(row: dict) -> str:
    """The method a point evaluated; points written before methods existed are ``carrier``
    (:func:`fingerprint_lm.models.checkpoint.recorded_method`'s rule, not imported: it would pull
    diffusers into the summary command's start-up)."""
    return str(row.get("method") or "carrier")


def _groups(rows: list[dict]) -> list[tuple[str, int]]:
    """(method, fingerprint length) pairs present, in order: one headline section and plot line each."""
    return sorted({(method_of(r), r["fingerprint_bits"]) for r in rows if r.get("fingerprint_bits") is not None})


def _in_group(row: dict, group: tuple[str, int]) -> bool:
    return (method_of(row), row.get("fingerprint_bits")) == group


def _sort_key(row: dict) -> tuple:
    act = row.get("act")
    strength = row.get("attack_strength")
    return (
        method_of(row),
        row.get("fingerprint_bits") or 0,
        ACT_TYPES.index(act) if act in ACT_TYPES else len(ACT_TYPES),
        str(act),
        str(row.get("attack")),
        -math.inf if strength is None else float(strength),
        row.get("colluders") or 0,
        str(row.get("case")),
    )


def _cell(value: Any, digits: int = 4, rate: bool = False) -> str:
    """``rate``: always ``digits`` decimals (a whole float prints as ``1`` otherwise, right for counts)."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.{digits}f}" if rate or not value.is_integer() or abs(value) >= 1e15 else f"{value:g}"
    return str(value)


def summary_csv(rows: list[dict]) -> str:
    return csv_text(COLUMNS, rows, lambda value: _cell(value, 6))


def summary_markdown(rows: list[dict], title: str = "Collusion sweep") -> str:
    lines = [
        f"# {title}",
        "",
        f"{len(rows)} points. fid_proxy is a proxy (a small feature net trained on the "
        "procedural images), not FID; compare it with fid_proxy_base (base decoder).",
        "",
        *comparison_lines(rows),
        *method_lines(rows),
        *headline_lines(rows),
        *tracing_lines(rows),
    ]
    lines += markdown_lines(MARKDOWN_COLUMNS, rows, lambda value: _cell(value, 3))
    return "\n".join(lines) + "\n"


def _find(rows: list[dict], group: tuple[str, int], act: str, attack: str, colluders: int,
          strength: float | None = None) -> dict | None:
    for row in rows:
        if _in_group(row, group) and (row.get("act"), row.get("attack"), row.get("colluders"),
                                      row.get("attack_strength")) == (act, attack, colluders, strength):
            return row
    return None


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def comparison_lines(rows: list[dict]) -> list[str]:
    """One row per method and length (ACT ``all`` where a case was swept with it): clean bit accuracy
    and PSNR; mean and worst bit accuracy over image attacks and over model attacks; 2-party
    averaging's PSNR and fid_proxy without ACT and with ACT all; the adaptive colluder; colluders
    caught over every collusion case; the slowest issue of one copy seen in the sweep (a method
    that trains each copy pays it once per new code, a screened one its screen's draws)."""
    groups = _groups(rows)
    if not groups:
        return []
    columns = ["method", "clean bit_acc", "PSNR", "image attacks: mean / worst", "model attacks: mean / worst",
               "2-party average, no ACT: PSNR / fid_proxy", "ACT all: PSNR / fid_proxy",
               "adaptive colluder: PSNR / bit_acc", "colluders caught", "innocents accused", "issue one copy (s)"]
    table = []
    for group in groups:
        mine = [r for r in rows if _in_group(r, group)]
        single = [r for r in mine if r.get("colluders") == 1 and r.get("act") == "all"] or \
            [r for r in mine if r.get("colluders") == 1]
        clean = next((r for r in single if r.get("attack") == "none"), None)

        plain, act_all = _find(rows, group, "none", "average", 2), _find(rows, group, "all", "average", 2)
        adaptive = _find(rows, group, "all", "aligned_average", 2)
        colluding = [r for r in mine if (r.get("colluders") or 0) >= 2 and r.get("act") == "all"]
        rate = next((r["screen_pass_rate"] for r in mine if r.get("screen_pass_rate")), None)
        cells = [
            f"{group[0]} {group[1]}-bit" + (f", screened codes (pass rate {rate:.3f})" if rate else ""),
            _cell(clean.get("bit_acc") if clean else None, 3),
            _cell(clean.get("psnr") if clean else None, 2),
            _spread(single, "image"),
            _spread(single, "model"),
            _pair(plain, "psnr", "fid_proxy", 2, 1),
            _pair(act_all, "psnr", "fid_proxy", 2, 1),
            _pair(adaptive, "psnr", "bit_acc", 2, 3),
            f"{sum(r.get('tracing_caught') or 0 for r in colluding)}/{sum(r['colluders'] for r in colluding)}"
            if colluding else "",
            str(sum(r.get("tracing_innocents_accused") or 0 for r in colluding)) if colluding else "",
            _cell(max((r.get("issue_seconds") or 0.0 for r in mine), default=None), 3),
        ]
        table.append(cells)
    return ["## Methods compared (ACT all unless stated; fid_proxy is a proxy, not FID)", "",
            *markdown_lines(columns, table), ""]


def _spread(rows: list[dict], kind: str) -> str:
    """Mean and worst bit accuracy over the ``kind`` attacks among ``rows``, the worst case named."""
    values = [(r["bit_acc"], r.get("case") or r["attack"]) for r in rows if _attack_kind(r) == kind]
    if not values:
        return ""
    worst = min(values)
    return f"{_cell(_mean([v for v, _ in values]), 3)} / {_cell(worst[0], 3)} ({worst[1]})"


def _pair(row: dict | None, a: str, b: str, digits_a: int, digits_b: int) -> str:
    return "" if row is None else f"{_cell(row.get(a), digits_a)} / {_cell(row.get(b), digits_b)}"


def _attack_kind(row: dict) -> str:
    """image | model | other: the kind the point recorded (plug-ins registered in the sweep's own
    processes included), else looked up by name (rows from before points recorded it)."""
    try:
        kind = row.get("attack_kind") or attack_kind(row["attack"])
    except ConfigError:  # a plug-in of another process, in a row that did not record its kind
        kind = "other"
    return kind if kind in ("image", "model") else "other"


def method_lines(rows: list[dict]) -> list[str]:
    """Methods side by side (when a sweep has more than one): bit accuracy of one user's copy (ACT
    ``all``, else the first ACT type present) under each single-copy case, a column per method."""
    groups = _groups(rows)
    if len({method for method, _ in groups}) < 2:
        return []
    cases = sorted({(r.get("attack"), r.get("attack_strength"), r.get("case"))
                    for r in rows if r.get("colluders") == 1},
                   key=lambda c: (c[0] != "none", str(c[0]), -math.inf if c[1] is None else float(c[1])))
    table = []
    for attack, strength, case in cases:
        cells = []
        for group in groups:
            row = _find(rows, group, "all", attack, 1, strength) or next(
                (r for r in rows if _in_group(r, group) and r.get("case") == case), None)
            cells.append("" if row is None
                         else f"{_cell(row.get('bit_acc'), 3, rate=True)} ({_cell(row.get('psnr'), 1)})")
        table.append([case, *cells])
    return ["## Methods side by side: bit accuracy of one copy (ACT all; PSNR vs the base decoder in brackets)", "",
            *markdown_lines(["case", *(f"{m} {b}-bit" for m, b in groups)], table), ""]


def headline_lines(rows: list[dict]) -> list[str]:
    """The sweep's questions answered per fingerprint length, before the full table: does an
    un-attacked copy keep its bits, and what does 2-party collusion do with each ACT type (PSNR drop
    and fid_proxy ratio against 2-party averaging without ACT), naive and adaptive."""
    out: list[str] = []
    groups = _groups(rows)
    several = len({method for method, _ in groups}) > 1
    for group in groups:
        method, bits = group
        alone = [r["bit_acc"] for r in rows if _in_group(r, group) and r.get("attack") == "none"]
        baseline = _find(rows, group, "none", "average", 2)
        header = f"## {method}: {bits}-bit fingerprints" if several else f"## {bits}-bit fingerprints"
        if alone:
            header += f": un-attacked copies keep bit_acc {min(alone):.3f} (lowest over ACT types)"
        out += [header, ""]
        if baseline is None or baseline.get("psnr") is None:
            out += ["(no `average_c2` point without ACT: no collusion headline)", ""]
            continue
        table = []
        for act in ACT_TYPES:
            naive, aligned = _find(rows, group, act, "average", 2), _find(rows, group, act, "aligned_average", 2)
            if naive is None:
                continue
            ratio = None
            if naive.get("fid_proxy") is not None and baseline.get("fid_proxy"):
                ratio = naive["fid_proxy"] / baseline["fid_proxy"]
            cells = [act, _cell(naive.get("psnr"), 2), _cell(baseline["psnr"] - naive["psnr"], 2),
                     _cell(naive.get("fid_proxy"), 1), _cell(ratio, 2)]
            cells += ([_cell(aligned.get(k), d) for k, d in (("psnr", 2), ("fid_proxy", 1), ("bit_acc", 3))]
                      if aligned else ["", "", ""])
            table.append(cells)
        out += [*markdown_lines(HEADLINE_COLUMNS, table), ""]
    return out


# the adaptive colluder's columns repeat two names of the naive average's: rows are lists
HEADLINE_COLUMNS = ("ACT", "2-party average: PSNR", "PSNR drop vs no ACT", "fid_proxy", "x no-ACT fid_proxy",
                    "adaptive colluder: PSNR", "fid_proxy", "bit_acc")


def tracing_lines(rows: list[dict]) -> list[str]:
    """Who tracing names when ``c`` users collude (ACT all, else the first ACT type present), per
    method and length: colluders caught, innocents accused, share of images attributed to a colluder."""
    cases = sorted({(r.get("attack"), r.get("colluders")) for r in rows if (r.get("colluders") or 0) >= 2},
                   key=lambda c: (str(c[0]), c[1]))
    if not cases:
        return []
    groups = _groups(rows)
    table = []
    for attack, colluders in cases:
        cells = []
        for group in groups:
            row = _find(rows, group, "all", attack, colluders) or next(
                (r for r in rows
                 if _in_group(r, group) and (r.get("attack"), r.get("colluders")) == (attack, colluders)),
                None)
            cells.append("" if row is None else f"{row.get('tracing_caught')}/{colluders}, "
                         f"{row.get('tracing_innocents_accused')}, {_cell(row.get('attribution_acc'), 2)}")
        table.append([attack, colluders, *cells])
    return ["## Tracing colluders: caught / c, innocents accused, images attributed to a colluder", "",
            *markdown_lines(["collusion", "c", *(f"{m} {b}-bit" for m, b in groups)], table), ""]


def _plot_collusion(rows: list[dict], metric: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(_MERGE_PLOTS), figsize=(9, 3.4), sharey=True)
    groups = _groups(rows)
    styles = ["-", "--", ":", "-."]
    for ax, merge in zip(axes, _MERGE_PLOTS, strict=True):
        for act_index, act in enumerate(ACT_TYPES):
            for length_index, group in enumerate(groups):
                points = sorted(
                    (r["colluders"], r[metric])
                    for r in rows
                    if r.get("act") == act
                    and _in_group(r, group)
                    and r.get(metric) is not None
                    and (r.get("attack") == merge or (r.get("attack") == "none" and r.get("colluders") == 1))
                )
                if points:
                    label = f"ACT {act}" + (f", {group[0]} {group[1]} bits" if len(groups) > 1 else "")
                    ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", lw=1, label=label,
                            color=f"C{act_index}", ls=styles[length_index % len(styles)])
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
    groups = _groups(rows)
    for attack_index, attack in enumerate(attacks):
        for length_index, group in enumerate(groups):
            mine = [r for r in rows if r.get("attack") == attack and _in_group(r, group)
                    and r.get("attack_strength") is not None]
            # ACT does not change an image attack's effect on one copy: prefer the no-ACT rows.
            points = sorted((r["attack_strength"], r["bit_acc"]) for r in mine if r.get("act") == "none") or sorted(
                (r["attack_strength"], r["bit_acc"]) for r in mine
            )
            if points:
                label = attack + (f", {group[0]} {group[1]} bits" if len(groups) > 1 else "")
                ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", lw=1, label=label,
                        color=f"C{attack_index % 10}", ls=["-", "--", ":", "-."][length_index % 4])
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
    with atomic_files(sweep_dir) as staging:  # a killed summary leaves the previous one whole
        staged = [staging / name for name in SUMMARY_FILES]
        staged[0].write_text(summary_csv(rows))
        staged[1].write_text(summary_markdown(rows, f"Collusion sweep {sweep_dir.name}"))
        _plot_collusion(rows, "psnr", staged[2])
        _plot_collusion(rows, "fid_proxy", staged[3])
        _plot_strength(rows, staged[4])
    return [sweep_dir / name for name in SUMMARY_FILES]
