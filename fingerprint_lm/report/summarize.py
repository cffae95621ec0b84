"""``python -m fingerprint_lm.report.summarize SWEEP_DIR``: (re)write a sweep's summary files."""

from __future__ import annotations

import argparse
import sys

from fingerprint_lm.errors import FingerprintError
from fingerprint_lm.report.tables import write_summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split(":")[1].strip())
    parser.add_argument("sweep_dir", help="a multirun directory holding <job>/metrics.json")
    args = parser.parse_args(argv)
    try:
        paths = write_summary(args.sweep_dir)
    except FingerprintError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
