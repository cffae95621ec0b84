"""Training curves of several runs side by side, against the step (issue 11: does a longer run pay?).

Each run's ``training_curve.csv`` (written by ``python -m fingerprint_lm +experiment=train``) holds
the bit accuracy and PSNR of every training batch; this smooths them over ``--window`` steps and
draws one line per run in a two-panel PNG, and prints a table of the smoothed bit accuracy at
every ``--every`` steps (the training batches' figure, not the held-out one in ``metrics.json``).

    python experiments/curve_compare.py "12000 steps=experiments/results/embedded_pnm_training_curve_2026-12-04.csv" \\
        "16000 steps=<run>/training_curve.csv" --png experiments/results/pnm_longer_run_curves.png
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import matplotlib

from fingerprint_lm.errors import DataError, check_int, exit_on_user_error

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_curve(spec: str) -> tuple[str, list[int], list[float], list[float]]:
    label, _, path = spec.rpartition("=")
    path = Path(path)
    if not label or not path.is_file():
        raise DataError(f"expected LABEL=path/to/training_curve.csv with an existing file, got {spec!r}")
    rows = [r for r in csv.DictReader(path.open()) if r.get("bit_acc")]
    if not rows or "step" not in rows[0]:
        raise DataError(f"{path} has no step/bit_acc rows: not a training curve")
    return (label, [int(r["step"]) for r in rows], [float(r["bit_acc"]) for r in rows],
            [float(r["psnr"]) for r in rows])


def smooth(values: list[float], window: int) -> list[float]:
    """The mean of each value and the ``window - 1`` before it (fewer at the start)."""
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("curves", nargs="+", help="LABEL=path/to/training_curve.csv")
    parser.add_argument("--window", type=int, default=250)
    parser.add_argument("--every", type=int, default=1000)
    parser.add_argument("--png", type=Path, default=None)
    args = parser.parse_args()
    check_int("--window", args.window)
    check_int("--every", args.every)
    # each run's smoothed curves once: (label, steps, bit accuracy, PSNR)
    runs = [(label, steps, smooth(acc, args.window), smooth(psnr, args.window))
            for label, steps, acc, psnr in map(read_curve, args.curves)]
    last = max(steps[-1] for _, steps, _, _ in runs)
    print("| step | " + " | ".join(label for label, *_ in runs) + " |")
    print("|---|" + "---|" * len(runs))
    for at in range(args.every, last + 1, args.every):
        cells = []
        for _, steps, acc, _ in runs:
            index = max((i for i, s in enumerate(steps) if s <= at), default=None)
            cells.append("" if index is None or steps[-1] < at else f"{acc[index]:.3f}")
        print(f"| {at} | " + " | ".join(cells) + " |")
    if args.png is not None:
        fig, (ax_acc, ax_psnr) = plt.subplots(1, 2, figsize=(10, 3.4))
        for label, steps, acc, psnr in runs:
            ax_acc.plot(steps, acc, lw=1, label=label)
            ax_psnr.plot(steps, psnr, lw=1, label=label)
        ax_acc.axhline(0.99, color="grey", ls="--", lw=0.8)
        ax_acc.set(xlabel="step", ylabel=f"bit accuracy (train batches, mean of {args.window})", ylim=(0.45, 1.01))
        ax_psnr.axhline(30, color="grey", ls="--", lw=0.8)
        ax_psnr.set(xlabel="step", ylabel="PSNR vs base decoder (dB)", ylim=(20, 40))  # step 1 reads ~120 dB
        ax_acc.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        fig.savefig(args.png, dpi=120)
        plt.close(fig)
        print(f"\nwrote {args.png}")


if __name__ == "__main__":
    exit_on_user_error(main)
