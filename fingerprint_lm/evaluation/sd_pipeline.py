"""A local Stable Diffusion folder with a user's copy as its VAE: loading it without downloads or
library chatter, checking the copy fits, making latents and decoding them to 8-bit pixels
(used by :mod:`fingerprint_lm.evaluation.text2image`)."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from fingerprint_lm.errors import CheckpointError, ConfigError
from fingerprint_lm.models.vae import decode_latents, load_vae
from fingerprint_lm.pixels import to_uint8


# -- loading --------------------------------------------------------------------------------------
@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """transformers' and diffusers' loggers at ERROR and their loading bars off, restored after:
    their import-time and load-time notices would otherwise break the one-line error contract."""
    # transformers' import takes seconds: only the text-to-image task pays for it
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    libraries = (transformers_logging, diffusers_logging)
    before = [(lib.get_verbosity(), lib.is_progress_bar_enabled()) for lib in libraries]
    for lib in libraries:
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, (level, bars) in zip(libraries, before):
            lib.set_verbosity(level)
            if bars:
                lib.enable_progress_bar()


def check_pipeline_folder(path: str | Path | None) -> Path:
    """The pipeline folder, if it looks like a saved diffusers pipeline (``model_index.json``)."""
    if path is None or str(path) == "":
        raise ConfigError(
            "task=text2image_eval needs text2image.pipeline_path=PATH (a local Stable Diffusion folder)"
        )
    folder = Path(str(path)).expanduser()
    if not (folder / "model_index.json").is_file():
        what = "no such folder" if not folder.exists() else "model_index.json missing"
        raise CheckpointError(f"no Stable Diffusion pipeline at {folder} ({what})")
    return folder


def load_text2image_pipeline(path: str | Path, vae, device: torch.device, dtype: torch.dtype = torch.float32):
    """``StableDiffusionPipeline.from_pretrained(path, vae=vae)`` from local files only.

    ``vae`` (the user's copy) replaces the folder's own VAE at load time, so the pipeline's latent
    scale factor is the copy's and the folder's VAE is not loaded for nothing; it stays in float32.
    No safety checker (the evaluation looks at every image). Raises CheckpointError, in one line,
    for a folder diffusers cannot load.
    """
    folder = check_pipeline_folder(path)
    with quiet_libraries(), warnings.catch_warnings():
        from diffusers import StableDiffusionPipeline  # pulls in transformers: imported on use

        try:
            # `torch_dtype` is what every diffusers >= 0.30 takes; newer ones prefer `dtype` and say so
            warnings.filterwarnings("ignore", message=".*torch_dtype.* is deprecated", category=FutureWarning)
            pipe = StableDiffusionPipeline.from_pretrained(
                folder,
                vae=vae,
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
                torch_dtype=dtype,
                local_files_only=True,
                low_cpu_mem_usage=False,  # what diffusers falls back to without accelerate, minus the warning
            )
        except Exception as exc:  # diffusers/transformers raise many kinds for incomplete folders
            message = f"cannot load the Stable Diffusion pipeline at {folder}: {type(exc).__name__}: {exc}"
            raise CheckpointError(message.splitlines()[0]) from exc
    pipe = pipe.to(device)  # the copy was passed in: it keeps its float32, whatever ``dtype`` is
    pipe.set_progress_bar_config(disable=True)  # one bar over images instead of one per batch
    return pipe


def load_pipeline_vae(path: str | Path):
    """The pipeline folder's own VAE (``<path>/vae``) in float32, the control decoder; None if absent."""
    folder = Path(path) / "vae"
    if not (folder / "config.json").is_file():
        return None
    with quiet_libraries():
        return load_vae(folder).eval()


def check_copy_fits(pipe, copy_vae, base_vae=None, copy_path: str | Path = "the copy") -> None:
    """ConfigError unless the copy decodes this pipeline's latents: as many latent channels as the
    UNet makes and, when the folder's own VAE is there, the same scaling factor and downscale."""
    unet_channels = int(pipe.unet.config.in_channels)
    if int(copy_vae.config.latent_channels) != unet_channels:
        raise ConfigError(
            f"{copy_path} decodes {copy_vae.config.latent_channels}-channel latents but the pipeline's UNet "
            f"makes {unet_channels}: the copy was issued for another model"
        )
    if base_vae is None:
        return
    for key in ("latent_channels", "scaling_factor"):
        if getattr(copy_vae.config, key) != getattr(base_vae.config, key):
            raise ConfigError(
                f"{copy_path} has {key}={getattr(copy_vae.config, key)} but the pipeline's VAE "
                f"{getattr(base_vae.config, key)}: the copy was issued for another model"
            )
    if len(copy_vae.config.block_out_channels) != len(base_vae.config.block_out_channels):
        raise ConfigError(f"{copy_path} and the pipeline's VAE downscale by different factors")


# -- generation -----------------------------------------------------------------------------------
@torch.no_grad()
def generate_latents(
    pipe,
    prompts: Sequence[str],
    seeds: Sequence[int],
    resolution: int,
    num_inference_steps: int,
    guidance_scale: float,
) -> torch.Tensor:
    """Denoised latents ``[B, C, R/f, R/f]`` (pipeline dtype), scaled as the UNet sees them.

    One CPU generator per prompt: diffusers draws each sample's noise from its own generator, so
    sample ``i`` does not depend on its batch neighbours, and CPU draws are the same on every device.
    """
    generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
    out = pipe(
        prompt=list(prompts),
        height=resolution,
        width=resolution,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        generator=generators,
        output_type="latent",
    )
    return out.images


@torch.no_grad()
def decode_to_pixels(vae, latents: torch.Tensor) -> np.ndarray:
    """8-bit RGB ``uint8 [B, H, W, 3]`` of UNet latents: float32 decode of
    ``latents / scaling_factor`` (as StableDiffusionPipeline does), clipped to [-1, 1], rounded."""
    scaled = latents.to(next(vae.parameters()).device, torch.float32) / float(vae.config.scaling_factor)
    return to_uint8(decode_latents(vae, scaled))


