"""The commands of ``python -m fingerprint_lm task=<name>``: the only code that reads the Hydra config.

Every layer below takes plain arguments; a task turns ``cfg`` into those arguments, calls them and
hands its result to :func:`~fingerprint_lm.tasks.wrapper.run_task`, which writes the JSON, prints
the summary and closes loggers (``docs/design.md``, "Package layout").
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from fingerprint_lm.errors import ConfigError
from fingerprint_lm.tasks import distributor, report, sweep_point, text2image_eval, train
from fingerprint_lm.tasks.wrapper import Task, run_task

# The command table: task name -> what runs (conf/config.yaml's `task:` names these).
TASKS: dict[str, Task] = {
    "train": train.TASK,
    "sweep_point": sweep_point.TASK,
    "text2image_eval": text2image_eval.TASK,
    "report": report.TASK,
    "issue": distributor.ISSUE,
    "users": distributor.USERS,
    "attribute": distributor.ATTRIBUTE,
    "trace": distributor.TRACE,
    "generate": distributor.GENERATE,
    "verify": distributor.VERIFY,
}


def run(cfg: DictConfig) -> dict[str, Any]:
    """Run ``cfg.task``; returns its result (the dict its JSON file holds)."""
    task = TASKS.get(str(cfg.task))
    if task is None:
        raise ConfigError(f"unknown task '{cfg.task}' (expected: {', '.join(TASKS)})")
    return run_task(task, cfg)
