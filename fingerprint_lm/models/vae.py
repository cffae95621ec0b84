"""Base VAE: a diffusers ``AutoencoderKL`` built from a config dict or loaded from a local folder.

Nothing here downloads: ``from_pretrained`` is only ever called on a local directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL

from fingerprint_lm.errors import CheckpointError, ConfigError, check_int

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


# Stable Diffusion 1.x/2.x VAE layout (the shape of `<sd folder>/vae/config.json`): 4 levels
# (downscale factor 8), two ResnetBlocks per down block and three per up block, attention in the
# mid block, 32 groups. Used randomly initialised by `make bench`, never downloaded.
SD_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 768,
    "scaling_factor": 0.18215,
}

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype:
    """``model.dtype`` -> torch dtype (None: float32)."""
    if name is None:
        return torch.float32
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ConfigError(f"unknown VAE dtype '{name}' (expected one of {', '.join(DTYPES)})")
    return DTYPES[name]


@dataclass(frozen=True)
class BaseVAESpec:
    """The base VAE a run fingerprints (``conf/model/*.yaml``, instantiated through ``_target_``):
    built from ``vae_config`` and pretrained here (``source="config"``), or loaded from a local
    diffusers folder (``source="pretrained"``, ``path``). The ranges are checked here, once."""

    source: str = "config"
    path: str | None = None
    vae_config: dict[str, Any] | None = None
    pretrain: dict[str, Any] | None = None
    dtype: str | None = None  # the weights' dtype: None (float32) | bfloat16 | float16
    scaling_factor: float | None = None  # None: the VAE's own; a number must match it
    gradient_checkpointing: bool = False
    freeze_encoder: bool = False  # pretraining trains the decoder side only
    calibration_batch_size: int = 256  # images per decoder pass of calibration / detector fit

    def __post_init__(self) -> None:
        if self.source not in ("config", "pretrained"):
            raise ConfigError(f"unknown model.source '{self.source}' (expected 'config' or 'pretrained')")
        if self.source == "config":
            check_int("model.pretrain.steps", (self.pretrain or {}).get("steps"))
        elif not self.path:
            raise ConfigError("model.source=pretrained needs model.path (a local diffusers VAE folder)")
        check_int("model.calibration_batch_size", self.calibration_batch_size)
        parse_dtype(self.dtype)


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
        if (path / "model_index.json").is_file() and (path / "vae" / "config.json").is_file():
            raise CheckpointError(f"{path} is a diffusers pipeline folder: point at its VAE, {path / 'vae'}")
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


def freeze_encoder(vae: AutoencoderKL) -> None:
    """Take the encoder side (``encoder``, ``quant_conv``) out of training: no gradients, eval
    mode. Its latent space is what a diffusion model was trained on, so it must not move."""
    for module in (vae.encoder, getattr(vae, "quant_conv", None)):
        if module is not None:
            module.requires_grad_(False)
            module.eval()


def encoder_parameters(vae: AutoencoderKL) -> list[torch.nn.Parameter]:
    """The parameters of the encoder side (``encoder`` and ``quant_conv``)."""
    params = list(vae.encoder.parameters())
    if getattr(vae, "quant_conv", None) is not None:
        params += list(vae.quant_conv.parameters())
    return params


def encode_latents(vae: AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    """The posterior mode of ``images`` as float32 latents, whatever dtype the VAE is held in."""
    images = images.to(vae.encoder.conv_in.weight.dtype)
    return vae.encode(images).latent_dist.mode().float()


def decode_latents(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """``vae``'s images of ``latents`` as float32, whatever dtype the VAE is held in (``model.dtype``)."""
    return vae.decode(latents.to(vae.decoder.conv_in.weight.dtype)).sample.float()
