"""Base VAE: a diffusers ``AutoencoderKL`` built from a config dict or loaded from a local folder.

Nothing here downloads: ``from_pretrained`` is only ever called on a local directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL

from fingerprint_lm.errors import CheckpointError, ConfigError

# The embedded default: 3 resolution levels (downscale factor 4), 16 channels at full resolution.
TINY_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "block_out_channels": [16, 32, 64],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 8,
    "sample_size": 32,
    "scaling_factor": 1.0,
}


def build_vae(config: dict[str, Any] | None = None) -> AutoencoderKL:
    """Build a randomly initialised ``AutoencoderKL`` from a diffusers config dict."""
    config = dict(TINY_VAE_CONFIG if config is None else config)
    try:
        return AutoencoderKL(**config)
    except TypeError as exc:  # unknown key in the config
        raise ConfigError(f"invalid VAE config: {exc}") from exc


def load_vae(path: str | Path, dtype: torch.dtype = torch.float32) -> AutoencoderKL:
    """Load an ``AutoencoderKL`` from a local diffusers folder (``config.json`` + weights)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"no diffusers VAE folder at {path} (config.json missing)")
    try:
        # low_cpu_mem_usage=False is what diffusers falls back to without `accelerate`; asking for it
        # directly skips a multi-line warning on stderr (errors must stay one line).
        return AutoencoderKL.from_pretrained(path, torch_dtype=dtype, local_files_only=True, low_cpu_mem_usage=False)
    except Exception as exc:  # diffusers raises many kinds for truncated/corrupt files
        raise CheckpointError(f"cannot load VAE from {path}: {type(exc).__name__}: {exc}".splitlines()[0]) from exc


def downscale_factor(vae: AutoencoderKL) -> int:
    """Image side / latent side: 2 ** (number of down blocks - 1)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)
