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
from fingerprint_lm.models import batched
from fingerprint_lm.pixels import to_uint8


def held_out_images(resolution: int, n: int, seed: int = 0) -> torch.Tensor:
    """The first ``n`` images ``[n, 3, R, R]`` in [-1, 1] of the procedural test set of ``seed``
    (the same set training holds out)."""
    check_int("n_images", n)
    images = ProceduralImages(int(resolution), seed=int(seed) + TEST_SEED_OFFSET, length=n)
    return torch.stack([images.sample(i)["image"] for i in range(n)])


def training_images(resolution: int, n: int, seed: int = 0) -> torch.Tensor:
    """The first ``n`` images ``[n, 3, R, R]`` in [-1, 1] of the procedural training stream of
    ``seed`` (the training config's): what fits made after training read (the post-training fit
    scripts in experiments/)."""
    check_int("n_images", n)
    images = ProceduralImages(int(resolution), seed=int(seed), length=n)
    return torch.stack([images.sample(i)["image"] for i in range(n)])


def decode_with(encoder_vae, decoder_vae, images: torch.Tensor, batch_size: int = 64,
                device: str | torch.device = "cpu") -> torch.Tensor:
    """``decoder_vae.decode(encoder_vae.encode(images).latent_dist.mode())``, in batches on
    ``device`` (:mod:`fingerprint_lm.models.batched`: no gradients, float32 on the CPU)."""
    return batched.decode(decoder_vae, batched.encode(encoder_vae, images, device, batch_size), device, batch_size)


def save_pngs(images: torch.Tensor, directory: str | Path, prefix: str = "img") -> list[str]:
    """Write ``[n, 3, H, W]`` images in [-1, 1] (clipped) as 8-bit PNGs ``<prefix>_0000.png``..."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    pixels = to_uint8(images)
    paths = []
    for i, array in enumerate(pixels):
        path = directory / f"{prefix}_{i:04d}.png"
        Image.fromarray(np.ascontiguousarray(array), "RGB").save(path)
        paths.append(str(path))
    return paths
