"""Shared fixtures: configs composed with hydra.compose, shrunk, with paths under tmp_path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

import fingerprint_lm  # noqa: F401  (registers the OmegaConf resolvers the configs use)

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# Tiny models: one thread is faster than two (no OpenMP hand-off), and immune to oversubscription.
torch.set_num_threads(1)

# A tiny AutoencoderKL (2 levels: downscale factor 2), fast enough for unit tests.
TINY_OVERRIDES = [
    "model.vae_config.block_out_channels=[8,16]",
    "model.vae_config.down_block_types=[DownEncoderBlock2D,DownEncoderBlock2D]",
    "model.vae_config.up_block_types=[UpDecoderBlock2D,UpDecoderBlock2D]",
    "model.vae_config.norm_num_groups=4",
    "model.pretrain.steps=30",
    "data.resolution=16",
    "data.batch_size=16",
    "data.val_size=32",
    "data.test_size=64",
    "method.steps=20",
    "method.detector_fit_samples=512",
    "method.extractor.cnn_channels=[8]",
    "method.pnm.mapping_hidden=32",
    "trainer.val_check_interval=10",
    "trainer.limit_val_batches=1",
    "trainer.enable_progress_bar=false",
    "callbacks.model_checkpoint.every_n_train_steps=10",
    "eval.max_images=64",
    "logger=none",
]


def compose_config(tmp_path: Path, overrides: list[str] = (), tiny: bool = True):
    """Compose ``conf/config.yaml`` as the entry point would, with outputs under ``tmp_path``."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[*(TINY_OVERRIDES if tiny else []), *overrides], return_hydra_config=True)
    with open_dict(cfg):
        cfg.paths.root_dir = str(tmp_path)
        cfg.paths.output_dir = str(tmp_path / "run")
        cfg.paths.cache_dir = str(tmp_path / "cache")
        cfg.paths.export_dir = str(tmp_path / "export")
        cfg.hydra.runtime.output_dir = str(tmp_path / "run")
        cfg.hydra.runtime.cwd = str(tmp_path)
    OmegaConf.resolve(cfg.paths)
    with open_dict(cfg):  # the composed config is in struct mode, which forbids deletion
        del cfg["hydra"]
    return cfg


@pytest.fixture
def tiny_cfg(tmp_path):
    return lambda overrides=(): compose_config(tmp_path, list(overrides))
