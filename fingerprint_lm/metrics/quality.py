"""Image fidelity between fingerprinted and base decoder outputs (images in [-1, 1])."""

from __future__ import annotations

import torch
from torchmetrics.functional.image import structural_similarity_index_measure

from fingerprint_lm.pixels import to_unit


def psnr(images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB on [0,1] images (data range 1); returns a [B] tensor."""
    mse = (to_unit(images) - to_unit(reference)).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-12))


def ssim(images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Mean SSIM on [0,1] images."""
    return structural_similarity_index_measure(to_unit(images).float(), to_unit(reference).float(), data_range=1.0)
