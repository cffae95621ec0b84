"""Every experiment composes; the config tree follows STYLE.md."""

from pathlib import Path

import pytest
from hydra.utils import instantiate

from tests.conftest import CONF, compose_config

EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def test_there_are_experiments():
    assert {"smoke", "train"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes(tmp_path, experiment):
    cfg = compose_config(tmp_path, [f"+experiment={experiment}"], tiny=False)
    assert cfg.fingerprint_bits > 0
    assert cfg.data._target_.endswith("ImageDataModule")
    text = (CONF / "experiment" / f"{experiment}.yaml").read_text()
    assert text.startswith("# @package _global_"), "experiments are global packages (STYLE.md)"


def test_config_yaml_does_not_list_experiment():
    text = (CONF / "config.yaml").read_text()
    assert "experiment" not in text.split("defaults:")[1].split("_self_")[0]


@pytest.mark.parametrize("trainer", ["cpu", "gpu", "ddp", "ddp_sim", "auto"])
def test_trainer_profiles_compose(tmp_path, trainer):
    cfg = compose_config(tmp_path, [f"trainer={trainer}"], tiny=False)
    assert cfg.trainer._target_ == "lightning.Trainer"
    if trainer == "ddp_sim":
        assert cfg.trainer.strategy.startswith("ddp_spawn") and cfg.trainer.accelerator == "cpu"


@pytest.mark.parametrize("logger", ["wandb", "csv", "none"])
def test_loggers_instantiate(tmp_path, logger):
    cfg = compose_config(tmp_path, [f"logger={logger}"])
    built = instantiate(cfg.logger) if cfg.logger else None
    assert (built is None) == (logger == "none")
    if logger == "wandb":
        assert built._offline is True and Path(built.save_dir) == tmp_path / "run"
