"""Entry point: ``python -m fingerprint_lm [+experiment=NAME] [overrides...]``."""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def hydra_main(cfg: DictConfig) -> float | None:
    from fingerprint_lm.errors import FingerprintError
    from fingerprint_lm.pipeline.run import run  # heavy imports only once the config is valid

    try:
        metrics = run(cfg)
    except FingerprintError as exc:
        # Inside the job: Hydra would print a traceback and exit 1 (SystemExit passes through it).
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    return metrics.get("bit_acc") if isinstance(metrics, dict) else None


def main() -> None:
    """Console entry: user errors become one line on stderr and exit code 2."""
    from fingerprint_lm.errors import exit_on_user_error

    exit_on_user_error(hydra_main)


if __name__ == "__main__":
    main()
