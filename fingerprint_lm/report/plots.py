"""Plots people would rather look at than read."""

from __future__ import annotations

from pathlib import Path

import matplotlib

from fingerprint_lm.report.text_tables import csv_text
from fingerprint_lm.storage import atomic_write_text

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def write_training_curve(history: list[dict], csv_path: str | Path, png_path: str | Path | None = None) -> None:
    """``history``: rows with ``step``, ``elapsed_s``, ``bit_acc``, ``psnr`` (training batches).
    Writes the CSV, and a two-panel PNG (bit accuracy and PSNR against wall time)."""
    if not history:
        return
    atomic_write_text(csv_path, csv_text(list(history[0]), history, lambda value: "" if value is None else str(value)))
    if png_path is None:
        return
    elapsed = [row["elapsed_s"] for row in history]
    fig, (ax_acc, ax_psnr) = plt.subplots(1, 2, figsize=(9, 3.2))
    ax_acc.plot(elapsed, [row["bit_acc"] for row in history], lw=1)
    ax_acc.axhline(0.99, color="grey", ls="--", lw=0.8)
    ax_acc.set(xlabel="wall time (s)", ylabel="bit accuracy (train batch)", ylim=(0.45, 1.01))
    ax_psnr.plot(elapsed, [row["psnr"] for row in history], lw=1, color="tab:orange")
    ax_psnr.axhline(30, color="grey", ls="--", lw=0.8)
    ax_psnr.set(xlabel="wall time (s)", ylabel="PSNR vs base decoder (dB)")
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
