"""The training augmentations' JPEG stand-in against real JPEG (PIL), the attack it models."""

from __future__ import annotations

import pytest
import torch

from fingerprint_lm.attacks.image import jpeg
from fingerprint_lm.distributor.generation import held_out_images
from fingerprint_lm.errors import ConfigError
from fingerprint_lm.models.augment import AugmentConfig, jpeg_like, random_augment


@pytest.mark.parametrize("quality", [90, 50])
def test_chroma_subsampled_jpeg_like_is_closer_to_real_jpeg(quality):
    """PIL encodes YCbCr with 4:2:0 chroma: the stand-in that does the same lands nearer its output
    (mean absolute error in [-1, 1] units) than the per-RGB-channel one, and changes the image by
    about as much as real JPEG does (within 25%; measured 0.030 vs 0.026 at q90, 0.049 vs 0.045 at q50)."""
    images = held_out_images(32, 64, seed=3)
    real = jpeg(images, quality)
    rgb, subsampled = jpeg_like(images, quality), jpeg_like(images, quality, chroma_subsampling=True)
    assert (subsampled - real).abs().mean() < 0.85 * (rgb - real).abs().mean()
    real_change = (real - images).abs().mean()
    assert abs((subsampled - images).abs().mean() - real_change) < 0.25 * real_change


def test_chroma_subsampled_jpeg_like_passes_gradients_and_checks_sides():
    images = held_out_images(32, 4, seed=1).requires_grad_(True)
    jpeg_like(images, 80, chroma_subsampling=True).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0  # straight-through rounding
    with pytest.raises(ConfigError, match="divisible by 16"):
        jpeg_like(torch.zeros(1, 3, 24, 24), 80, chroma_subsampling=True)
    jpeg_like(torch.zeros(1, 3, 24, 24), 80)  # the per-channel stand-in needs multiples of 8 only


def test_random_augment_uses_the_configured_jpeg():
    images = held_out_images(32, 8, seed=2)
    only_jpeg = dict(p_noise=0, p_blur=0, p_crop=0, p_brightness=0, p_jpeg=1.0, jpeg_quality=(70, 70))
    subsampled = random_augment(images, AugmentConfig(**only_jpeg, jpeg_chroma_subsampling=True))
    assert torch.allclose(subsampled, jpeg_like(images, 70, chroma_subsampling=True))
    assert not torch.allclose(subsampled, random_augment(images, AugmentConfig(**only_jpeg)))
