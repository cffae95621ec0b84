"""The project's configuration composed from Python, the way ``python -m fingerprint_lm`` composes it.

Scripts and benches that need a method's settings (``experiments/*.py``, ``bench_sd``) take them
from here instead of loading ``conf/method/<name>.yaml`` by path: the same defaults list, the same
overrides syntax, Hydra's checks, and no second reader of the config tree beside this layer.
Nothing is written and no run directory is made (Hydra's compose API, not a Hydra run).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

ROOT = Path(__file__).resolve().parents[2]
CONF_DIR = ROOT / "conf"


def compose_config(overrides: Sequence[str] = (), output_dir: Path | None = None) -> DictConfig:
    """``conf/config.yaml`` with ``overrides`` (command-line syntax: ``method=carrier``,
    ``+experiment=train``, ``fingerprint_bits=32``), as a run would see it before it starts.

    With ``output_dir``, for a script that runs a task's steps itself: Hydra's own node is kept and
    the paths a Hydra run resolves at start are set (the repository root, ``output_dir``), so
    ``${paths.*}`` and ``${hydra:runtime.cwd}`` interpolations resolve as in a run there."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides), return_hydra_config=output_dir is not None)
    if output_dir is not None:
        OmegaConf.update(cfg, "paths.root_dir", str(ROOT))
        OmegaConf.update(cfg, "paths.output_dir", str(output_dir))
        cfg.hydra.runtime.cwd = str(ROOT)
    return cfg


def method_config(name: str, overrides: Sequence[str] = ()) -> DictConfig:
    """The ``method`` group's entry ``name`` (``conf/method/<name>.yaml``), composed."""
    return compose_config([f"method={name}", *overrides]).method
