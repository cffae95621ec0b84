"""Entry point: ``python -m fingerprint_lm [+experiment=NAME] [overrides...]``."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import ConfigCompositionException, OverrideParseException
from omegaconf import DictConfig

from fingerprint_lm.errors import FingerprintError, exit_on_user_error, hydra_error_line
from fingerprint_lm.sweep_guard import remove_bare_job_dir, remove_unstarted_sweeps


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def hydra_main(cfg: DictConfig) -> float | None:
    # torch, Lightning and diffusers take seconds to import: only once Hydra has composed a valid
    # config, so a mistyped override gets its error line at once
    from fingerprint_lm.tasks import run

    try:
        metrics = run(cfg)
    except FingerprintError as exc:
        # Inside the job: Hydra would print a traceback and exit 1 (SystemExit passes through it).
        print(f"error: {exc}", file=sys.stderr)
        remove_bare_job_dir(Path(HydraConfig.get().runtime.output_dir), Path(str(cfg.paths.log_dir)))
        sys.exit(2)
    return metrics.get("bit_acc") if isinstance(metrics, dict) else None


TASK_CONFIGS = Path(__file__).resolve().parent.parent / "conf" / "task"


def task_argument_hint(exc: Exception) -> str | None:
    """``user_id=alice`` without ``task=issue``: which tasks take that argument (conf/task/), in
    place of Hydra's advice to append it with ``+``."""
    match = re.match(r"Could not override '(\w+)'", str(exc))
    if match is None or "not in struct" not in str(exc.__cause__):
        return None
    key = match.group(1)
    tasks = sorted(p.stem for p in TASK_CONFIGS.glob("*.yaml") if re.search(rf"^{key}:", p.read_text(), re.M))
    if not tasks:
        return None
    return f"{key}= is an argument of task={' | '.join(tasks)} only; name the task (conf/task/)"


def main() -> None:
    """Console entry: user errors, Hydra's included (unknown experiment or group option, bad
    override syntax), become one ``error: ...`` line on stderr and exit code 2."""
    # Hydra prints its own multi-line report and exits 1 unless HYDRA_FULL_ERROR=1, in which case it
    # re-raises: that is the only way to see its exceptions. A user who set it wants the full trace.
    wants_trace = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        exit_on_user_error(hydra_main)
    except (ConfigCompositionException, OverrideParseException) as exc:
        remove_unstarted_sweeps()
        if wants_trace:
            raise
        print(f"error: {task_argument_hint(exc) or hydra_error_line(exc)}", file=sys.stderr)
        sys.exit(2)
    finally:
        if not wants_trace:
            os.environ.pop("HYDRA_FULL_ERROR", None)


if __name__ == "__main__":
    main()
