"""Differentiable augmentations used while training the fingerprint (images in [-1, 1]).

They model the image-level attacks a user may apply, so the extractor learns to read through
them. The evaluation attacks (real JPEG through PIL, rotation, ...) live in ``attacks/``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from fingerprint_lm.errors import ConfigError, check_float
from fingerprint_lm.pixels import from_byte_scale, from_unit, to_byte_scale, to_unit


def gaussian_kernel(sigma: float, size: int, device=None, dtype=None) -> torch.Tensor:
    """Normalised 1-D Gaussian of ``size`` taps (computed in float64, returned in ``dtype``)."""
    coords = torch.arange(size, device=device, dtype=torch.float64) - (size - 1) / 2
    kernel = torch.exp(-(coords**2) / (2 * sigma**2))
    return (kernel / kernel.sum()).to(dtype)


def gaussian_blur(images: torch.Tensor, sigma: float, size: int = 3, padding: str = "reflect") -> torch.Tensor:
    """Separable Gaussian blur (``padding``: any ``F.pad`` mode)."""
    if sigma <= 0:
        return images
    k = gaussian_kernel(sigma, size, images.device, images.dtype)
    c = images.shape[1]
    x = F.pad(images, (size // 2,) * 4, mode=padding)
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, size), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, size, 1), groups=c)


def _dct_matrix(n: int, device, dtype) -> torch.Tensor:
    i = torch.arange(n, device=device, dtype=dtype)
    mat = torch.cos(math.pi * (2 * i[None, :] + 1) * i[:, None] / (2 * n)) * math.sqrt(2 / n)
    mat[0] /= math.sqrt(2)
    return mat


# JFIF's full-range BT.601 conversion (byte scale; Cb and Cr centred on 128)
_TO_YCBCR = torch.tensor([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]],
                         dtype=torch.float64)
_YCBCR_OFFSET = torch.tensor([0.0, 128.0, 128.0], dtype=torch.float64)
# The standard JPEG chrominance table (Cb and Cr, when chroma is subsampled).
_JPEG_CHROMA = torch.tensor([[17, 18, 24, 47, 99, 99, 99, 99], [18, 21, 26, 66, 99, 99, 99, 99],
                             [24, 26, 56, 99, 99, 99, 99, 99], [47, 66, 99, 99, 99, 99, 99, 99]]
                            + [[99] * 8] * 4, dtype=torch.float32)
# The standard JPEG luminance table (every RGB channel of the default approximation; Y otherwise).
_JPEG_LUMA = torch.tensor(
    [
        [16, 11, 10, 16, 24, 40, 51, 61], [12, 12, 14, 19, 26, 58, 60, 55],
        [14, 13, 16, 24, 40, 57, 69, 56], [14, 17, 22, 29, 51, 87, 80, 62],
        [18, 22, 37, 56, 68, 109, 103, 77], [24, 35, 55, 64, 81, 104, 113, 92],
        [49, 64, 78, 87, 103, 121, 120, 101], [72, 92, 95, 98, 112, 100, 103, 99],
    ],
    dtype=torch.float32,
)


def rgb_to_ycbcr(images: torch.Tensor) -> torch.Tensor:
    """``[B, 3, H, W]`` RGB -> Y, Cb, Cr by JFIF's BT.601 matrix (linear: no offset, any scale)."""
    return torch.einsum("ij,bjhw->bihw", _TO_YCBCR.to(images), images)


def ycbcr_to_rgb(channels: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`rgb_to_ycbcr`."""
    return torch.einsum("ij,bjhw->bihw", torch.linalg.inv(_TO_YCBCR.to(channels)), channels)


def _quality_table(table: torch.Tensor, quality: int, like: torch.Tensor) -> torch.Tensor:
    quality = max(1, min(100, int(quality)))
    scale = 5000 / quality if quality < 50 else 200 - 2 * quality
    return torch.clamp((table * scale + 50) // 100, min=1).to(like)


def _quantise_blocks(x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """8x8 DCT blocks of ``x`` (byte scale, sides multiples of 8) quantised by ``table`` with
    straight-through rounding."""
    b, c, h, w = x.shape
    dct = _dct_matrix(8, x.device, x.dtype)
    blocks = x.reshape(b, c, h // 8, 8, w // 8, 8).permute(0, 1, 2, 4, 3, 5)
    q = (dct @ (blocks - 128) @ dct.T) / table
    q = q + (torch.round(q) - q).detach()  # straight-through
    out = dct.T @ (q * table) @ dct + 128
    return out.permute(0, 1, 2, 4, 3, 5).reshape(b, c, h, w)


def jpeg_like(images: torch.Tensor, quality: int, chroma_subsampling: bool = False) -> torch.Tensor:
    """JPEG-like quantisation of 8x8 DCT blocks (straight-through rounding): a differentiable
    stand-in for real JPEG. By default every RGB channel is quantised with the luminance table and
    sides must be multiples of 8. ``chroma_subsampling`` models what PIL (and most encoders) do:
    BT.601 YCbCr, Y quantised with the luminance table, Cb and Cr averaged over 2x2 pixels (4:2:0),
    quantised with the chrominance table and repeated back; sides must be multiples of 16. The
    difference matters for a mark carried in colour: 4:2:0 alone removes chroma detail above a
    quarter cycle per pixel (experiments/results/jpeg_chroma_probe.md)."""
    b, c, h, w = images.shape
    block = 16 if chroma_subsampling else 8
    if h % block or w % block:
        raise ConfigError(f"jpeg_like{' with chroma subsampling' if chroma_subsampling else ''} "
                          f"needs sides divisible by {block}, got {h}x{w}")
    x = to_byte_scale(images)
    if not chroma_subsampling:
        return from_byte_scale(_quantise_blocks(x, _quality_table(_JPEG_LUMA, quality, images)))
    ycc = rgb_to_ycbcr(x) + _YCBCR_OFFSET.to(x).view(1, 3, 1, 1)
    luma = _quantise_blocks(ycc[:, :1], _quality_table(_JPEG_LUMA, quality, images))
    chroma = _quantise_blocks(F.avg_pool2d(ycc[:, 1:], 2), _quality_table(_JPEG_CHROMA, quality, images))
    chroma = chroma.repeat_interleave(2, -2).repeat_interleave(2, -1)
    ycc = torch.cat([luma, chroma], 1) - _YCBCR_OFFSET.to(x).view(1, 3, 1, 1)
    return from_byte_scale(ycbcr_to_rgb(ycc))


def crop_resize(images: torch.Tensor, keep_area: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random crop keeping ``keep_area`` of the area, resized back to the input size."""
    if keep_area >= 1:
        return images
    h, w = images.shape[-2:]
    side = math.sqrt(keep_area)
    ch, cw = max(1, round(h * side)), max(1, round(w * side))
    top = int(torch.randint(0, h - ch + 1, (1,), generator=generator))
    left = int(torch.randint(0, w - cw + 1, (1,), generator=generator))
    crop = images[..., top : top + ch, left : left + cw]
    return F.interpolate(crop, size=(h, w), mode="bilinear", align_corners=False)


def brightness(images: torch.Tensor, factor: float) -> torch.Tensor:
    """Multiply intensities in [0,1] space by ``factor`` (clamped back to range)."""
    out = from_unit(to_unit(images, clamp=False) * factor)
    # straight-through clamp so saturated pixels keep a gradient
    return images * factor + (out - images * factor).detach()


@dataclass
class AugmentConfig:
    """Probabilities and strength ranges of the training augmentations. ``p_*`` = 0 disables."""

    p_noise: float = 0.3
    noise_std: tuple[float, float] = (0.0, 0.1)  # in [0,1] units
    p_blur: float = 0.3
    blur_sigma: tuple[float, float] = (0.3, 1.0)
    p_jpeg: float = 0.3
    jpeg_quality: tuple[int, int] = (50, 95)
    p_crop: float = 0.0
    crop_keep_area: tuple[float, float] = (0.7, 1.0)
    p_brightness: float = 0.3
    brightness_factor: tuple[float, float] = (0.7, 1.3)
    # JPEG as encoders do it (YCbCr, 4:2:0 chroma, the chrominance table) instead of every RGB
    # channel through the luminance table; settable with `+method.augment.jpeg_chroma_subsampling=true`
    # (not in the YAMLs, so the shipped checkpoints' recorded recipes stay as they are)
    jpeg_chroma_subsampling: bool = False

    def __post_init__(self) -> None:
        # (probability, range, lowest allowed value, highest) of each augmentation
        for p_name, range_name, lowest, highest in (
            ("p_noise", "noise_std", 0.0, 1.0), ("p_blur", "blur_sigma", 0.0, 10.0),
            ("p_jpeg", "jpeg_quality", 1, 100), ("p_crop", "crop_keep_area", 0.01, 1.0),
            ("p_brightness", "brightness_factor", 0.0, 10.0),
        ):
            check_float(p_name, getattr(self, p_name), minimum=0.0, maximum=1.0)
            values = getattr(self, range_name)
            if isinstance(values, str) or len(values) != 2:
                raise ConfigError(f"{range_name} must be [low, high], got {values!r}")
            low = check_float(f"{range_name}[0]", values[0], minimum=lowest, maximum=highest)
            check_float(f"{range_name}[1]", values[1], minimum=low, maximum=highest)  # high >= low


def _uniform(low: float, high: float, generator: torch.Generator | None) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def random_augment(images: torch.Tensor, settings: AugmentConfig,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Apply each augmentation with its probability (one draw per batch, in a fixed order)."""

    def happens(p: float) -> bool:
        return p > 0 and float(torch.rand((), generator=generator)) < p

    x = images
    if happens(settings.p_crop):
        x = crop_resize(x, _uniform(*settings.crop_keep_area, generator), generator)
    if happens(settings.p_brightness):
        x = brightness(x, _uniform(*settings.brightness_factor, generator))
    if happens(settings.p_blur):
        x = gaussian_blur(x, _uniform(*settings.blur_sigma, generator))
    if happens(settings.p_noise):
        std = _uniform(*settings.noise_std, generator) * 2  # [0,1] -> [-1,1] units
        x = x + std * torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    block = 16 if settings.jpeg_chroma_subsampling else 8
    if happens(settings.p_jpeg) and x.shape[-1] % block == 0 and x.shape[-2] % block == 0:
        x = jpeg_like(x, int(_uniform(*settings.jpeg_quality, generator)), settings.jpeg_chroma_subsampling)
    return x
