"""Images from a copy on the embedded default: held-out procedural images are encoded with the base
VAE's encoder and decoded with the copy's decoder (the stand-in for a diffusion model's output at
real scale, where ``StableDiffusionPipeline`` runs with the personal VAE swapped in)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fingerprint_lm.data.datamodule import TEST_SEED_OFFSET
from fingerprint_lm.data.synthetic import ProceduralImages
from fingerprint_lm.errors import check_int


def held_out_images(resolution: int, n: int, seed: int = 0) -> torch.Tensor:
    """The first ``n`` images ``[n, 3, R, R]`` in [-1, 1] of the procedural test set of ``seed``
    (the same set training holds out)."""
    check_int("n_images", n)
    images = ProceduralImages(int(resolution), seed=int(seed) + TEST_SEED_OFFSET, length=n)
    return torch.stack([images.sample(i)["image"] for i in range(n)])


@torch.no_grad()
def decode_with(encoder_vae, decoder_vae, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """``decoder_vae.decode(encoder_vae.encode(images).latent_dist.mode())``, in batches."""
    out = []
    for start in range(0, len(images), batch_size):
        latents = encoder_vae.encode(images[start : start + batch_size]).latent_dist.mode()
        out.append(decoder_vae.decode(latents).sample)
    return torch.cat(out)


def to_uint8_pixels(images: torch.Tensor) -> np.ndarray:
    """``[n, 3, H, W]`` images in [-1, 1] (clipped) -> 8-bit RGB ``uint8 [n, H, W, 3]`` on the CPU."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def save_pngs(images: torch.Tensor, directory: str | Path, prefix: str = "img") -> list[str]:
    """Write ``[n, 3, H, W]`` images in [-1, 1] (clipped) as 8-bit PNGs ``<prefix>_0000.png``..."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    pixels = to_uint8_pixels(images)
    paths = []
    for i, array in enumerate(pixels):
        path = directory / f"{prefix}_{i:04d}.png"
        Image.fromarray(np.ascontiguousarray(array), "RGB").save(path)
        paths.append(str(path))
    return paths
