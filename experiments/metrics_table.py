"""One markdown table from the ``metrics.json`` of training runs (``python -m fingerprint_lm
+experiment=train ...``), a row per run: its label, steps, training-task seconds, held-out bit
accuracy, PSNR and SSIM against the decoder as it was, the mean training-batch bit accuracy over
the last quarter of the steps (from the run's ``training_curve.csv`` beside it, or
``<name>_training_curve.csv`` beside ``<name>_metrics.json``, where there is one), and the
robustness cases.

    python experiments/metrics_table.py "32 px=<run>/metrics.json" "64 px=<other run>/metrics.json"
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from fingerprint_lm.errors import DataError, exit_on_user_error


def read_run(spec: str) -> tuple[str, dict, float | None]:
    label, _, path = spec.rpartition("=")
    path = Path(path)
    if not label or not path.is_file():
        raise DataError(f"expected LABEL=path/to/metrics.json with an existing file, got {spec!r}")
    try:
        metrics = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path} is not JSON: {exc}") from exc
    if "bit_acc" not in metrics:
        raise DataError(f"{path} has no bit_acc: not a training run's metrics.json")
    curve = path.parent / "training_curve.csv"  # a run folder; copies in results/: <name>_training_curve.csv
    if path.name.endswith("_metrics.json"):
        curve = path.with_name(path.name.replace("_metrics.json", "_training_curve.csv"))
    late = None
    if curve.is_file():
        rows = [r for r in csv.DictReader(curve.open()) if r.get("bit_acc")]
        tail = [float(r["bit_acc"]) for r in rows if int(r["step"]) > 0.75 * int(rows[-1]["step"])]
        late = sum(tail) / len(tail) if tail else None
    return label, metrics, late


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="LABEL=path/to/metrics.json")
    runs = [read_run(spec) for spec in parser.parse_args().runs]
    cases = sorted({case for _, metrics, _ in runs for case in metrics.get("robustness", {})})
    print("| run | steps | task s | bit_acc | PSNR dB | SSIM | training batches, last quarter | "
          + " | ".join(cases) + " |")
    print("|---|---|---|---|---|---|---|" + "---|" * len(cases))
    for label, m, late in runs:
        robust = [f"{m['robustness'][c]:.3f}" if c in m.get("robustness", {}) else "" for c in cases]
        print(f"| {label} | {m.get('steps', '')} | {m.get('train_seconds', 0):.0f} | {m['bit_acc']:.3f} | "
              f"{m['psnr']:.2f} | "
              f"{m.get('ssim', float('nan')):.3f} | {'' if late is None else f'{late:.3f}'} | "
              + " | ".join(robust) + " |")


if __name__ == "__main__":
    exit_on_user_error(main)
