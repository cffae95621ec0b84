"""``python -m fingerprint_lm.report.summarize [SWEEP_DIR]``: (re)write a sweep's summary files.

Without SWEEP_DIR: the newest sweep with a finished point under ``outputs/multiruns/`` of the
current directory (where
``python -m fingerprint_lm +experiment=collusion_sweep`` writes its grid)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fingerprint_lm.errors import DataError, FingerprintError
from fingerprint_lm.report.tables import write_summary

DEFAULT_SWEEPS = Path("outputs") / "multiruns"


def newest_sweep(parent: Path = DEFAULT_SWEEPS) -> Path:
    """The newest ``<date>_<time>`` folder under ``parent`` (names sort by time) holding a finished
    point (a sweep stopped by a bad override before its first point holds none)."""
    sweeps = sorted(p.parent.parent for p in parent.glob("*/*/metrics.json")) if parent.is_dir() else []
    if not sweeps:
        raise DataError(f"no sweep under {parent}/ (run +experiment=collusion_sweep, or give SWEEP_DIR)")
    return sweeps[-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="(re)write a sweep's summary.csv, summary.md and plots")
    parser.add_argument(
        "sweep_dir", nargs="?",
        help=f"a multirun directory holding <job>/metrics.json (default: newest in {DEFAULT_SWEEPS}/)"
    )
    args = parser.parse_args(argv)
    try:
        paths = write_summary(args.sweep_dir or newest_sweep())
    except FingerprintError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
