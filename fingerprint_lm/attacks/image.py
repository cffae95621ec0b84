"""Image-level attacks for evaluation: what a user may do to an image before it is examined.

Every attack takes a batch ``[B, 3, H, W]`` in ``[-1, 1]`` and returns a new batch of the same
dtype and device, clamped to ``[-1, 1]``, and of the same shape except for the attacks in
:data:`SIZE_CHANGING` (``crop`` and ``shift`` cut pixels away without resizing back). The signature is always
``fn(images, strength, generator=None)``; attacks with a random part (crop position, noise)
draw it from ``generator`` only, so a seeded generator makes them deterministic. The input is
never modified.

Strengths follow the units of the peers' evaluations (Stable Signature, Fernandez et al. 2023;
WOUAF, Kim et al. 2024; the WAVES benchmark, An et al. 2024) so our grids are comparable:

============== ============================================ ==========
attack         strength                                     identity
============== ============================================ ==========
jpeg           quality 1..100 (real JPEG through PIL)       none
crop           fraction of the area kept, no resize         1.0
crop_resize    fraction of the area kept, then resized back 1.0
shift          pixels cut off the top and the left (a      0
               crop without resize at that offset)
resize         side scale factor, down and back up          1.0
rotation       degrees, bilinear, border fill               0
gaussian_blur  sigma in pixels (kernel 2 ceil(3 sigma) + 1) 0
gaussian_noise std on [0, 1] images                         0
brightness     factor (blend with black)                    1.0
contrast       factor (blend with the mean grey level)      1.0
saturation     factor (blend with the greyscale image)      1.0
combined       ignored: crop_resize 50% -> brightness 1.5 -> JPEG 80  none
============== ============================================ ==========

The colour attacks use the definitions of ``torchvision.transforms.functional.adjust_*`` (the
ones Stable Signature's evaluation uses), reimplemented here: torchvision is not a dependency.

Regeneration (a VAE encode/decode round trip, as in WAVES) needs a model, so it is not in
:data:`IMAGE_ATTACKS`: call :func:`regenerate`, or :func:`regeneration_attack` for a function with
the common signature (strength = number of round trips), or :func:`get_image_attack` for either.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from fingerprint_lm.errors import ConfigError
from fingerprint_lm.models import augment
from fingerprint_lm.models.batched import evaluating
from fingerprint_lm.pixels import from_uint8, from_unit, to_uint8, to_unit

ImageAttack = Callable[..., torch.Tensor]

# ITU-R 601-2 luma, as PIL's "L" conversion and torchvision's rgb_to_grayscale.
_LUMA = (0.299, 0.587, 0.114)


def _check_images(images: torch.Tensor) -> None:
    if images.dim() != 4 or images.shape[1] != 3:
        raise ConfigError(f"image attacks take [B, 3, H, W] batches, got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ConfigError(f"image attacks take floating-point images in [-1, 1], got {images.dtype}")


def jpeg(images: torch.Tensor, strength: float, generator: torch.Generator | None = None,
         subsampling: int = 2) -> torch.Tensor:
    """Real JPEG compression through PIL at quality ``strength`` (1..100; ``subsampling`` PIL's: 2 is
    4:2:0, its default and the attack's, 0 is 4:4:4). Images are quantised to 8 bits first, as a
    saved PNG would be. Deterministic."""
    _check_images(images)
    quality = int(round(float(strength)))
    if not 1 <= quality <= 100:
        raise ConfigError(f"JPEG quality must be in 1..100, got {strength}")
    decoded = []
    for array in to_uint8(images):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="JPEG", quality=quality, subsampling=subsampling)
        buffer.seek(0)
        with Image.open(buffer) as reloaded:
            decoded.append(np.asarray(reloaded.convert("RGB"), dtype=np.uint8))
    return from_uint8(np.stack(decoded), images.dtype).to(images.device)


def _crop_window(images: torch.Tensor, keep: float, generator: torch.Generator | None):
    """Per image, a square-aspect window holding ``keep`` of the area at a random position (from
    ``generator``): a list of [1, C, h, w] tensors, or None when the window is the whole image."""
    _check_images(images)
    keep = float(keep)
    if not 0 < keep <= 1:
        raise ConfigError(f"crop keeps a fraction of the area in (0, 1], got {keep}")
    height, width = images.shape[-2:]
    crop_h = min(height, max(1, round(height * math.sqrt(keep))))
    crop_w = min(width, max(1, round(width * math.sqrt(keep))))
    if (crop_h, crop_w) == (height, width):
        return None
    windows = []
    for image in images:
        top = int(torch.randint(0, height - crop_h + 1, (1,), generator=generator))
        left = int(torch.randint(0, width - crop_w + 1, (1,), generator=generator))
        windows.append(image[None, :, top : top + crop_h, left : left + crop_w])
    return windows


def crop(images: torch.Tensor, strength: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Keep a square-aspect window holding ``strength`` of the area (at a random position per
    image, from ``generator``), not resized: the output is smaller than the input."""
    windows = _crop_window(images, strength, generator)
    return images.clone() if windows is None else torch.cat(windows)  # cat copies


def crop_resize(images: torch.Tensor, strength: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """:func:`crop`, then resized back to the input size (bilinear)."""
    windows = _crop_window(images, strength, generator)
    if windows is None:
        return images.clone()
    size = tuple(images.shape[-2:])
    out = [F.interpolate(w, size=size, mode="bilinear", align_corners=False) for w in windows]
    return torch.cat(out).clamp(-1, 1)


def shift(images: torch.Tensor, strength: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Cut ``strength`` pixels off the top and the left, no resize: every pixel that stays moves by
    that offset relative to any fixed grid (a tile-aligned mark loses its alignment)."""
    _check_images(images)
    pixels = float(strength)
    height, width = images.shape[-2:]
    if pixels != int(pixels) or not 0 <= pixels < min(height, width):
        raise ConfigError(f"shift takes a whole number of pixels in [0, {min(height, width)}), got {strength}")
    return images[..., int(pixels) :, int(pixels) :].clone()


def resize(images: torch.Tensor, strength: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Scale the sides by ``strength`` (antialiased bilinear), then back to the input size."""
    _check_images(images)
    scale = float(strength)
    if not 0 < scale <= 1:
        raise ConfigError(f"resize scale must be in (0, 1], got {strength}")
    height, width = images.shape[-2:]
    small = (max(1, round(height * scale)), max(1, round(width * scale)))
    if small == (height, width):
        return images.clone()
    down = F.interpolate(images, size=small, mode="bilinear", align_corners=False, antialias=True)
    return F.interpolate(down, size=(height, width), mode="bilinear", align_corners=False).clamp(-1, 1)


def rotation(images: torch.Tensor, strength: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Rotate by ``strength`` degrees (counter-clockwise on screen) about the centre: bilinear
    sampling through ``affine_grid``, corners filled with the nearest border pixel."""
    _check_images(images)
    angle = math.radians(float(strength))
    height, width = images.shape[-2:]
    cos, sin = math.cos(angle), math.sin(angle)
    # affine_grid works in normalised coordinates; the aspect terms keep the rotation rigid in pixels.
    theta = torch.tensor(
        [[cos, -sin * height / width, 0.0], [sin * width / height, cos, 0.0]],
        dtype=images.dtype,
        device=images.device,
    ).expand(images.shape[0], 2, 3)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.clamp(-1, 1)


def gaussian_blur(
    images: torch.Tensor, strength: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Separable Gaussian blur of standard deviation ``strength`` pixels; the kernel spans
    ``2 * ceil(3 sigma) + 1`` taps (sigma 1 -> 7). Replicate padding keeps the borders' level."""
    _check_images(images)
    sigma = float(strength)
    if sigma < 0:
        raise ConfigError(f"blur sigma must be non-negative, got {strength}")
    if sigma == 0:
        return images.clone()
    size = 2 * math.ceil(3 * sigma) + 1
    return augment.gaussian_blur(images, sigma, size=size, padding="replicate").clamp(-1, 1)


def gaussian_noise(
    images: torch.Tensor, strength: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Add white Gaussian noise of standard deviation ``strength`` on the [0, 1] scale
    (twice that in [-1, 1] units), then clamp."""
    _check_images(images)
    std = float(strength)
    if std < 0:
        raise ConfigError(f"noise std must be non-negative, got {strength}")
    if std == 0:
        return images.clone()
    noise = torch.randn(images.shape, generator=generator, dtype=images.dtype, device="cpu")
    return (images + 2 * std * noise.to(images.device)).clamp(-1, 1)


def _check_factor(name: str, factor: float) -> float:
    factor = float(factor)
    if factor < 0:
        raise ConfigError(f"{name} factor must be non-negative, got {factor}")
    return factor


def _grayscale(unit_images: torch.Tensor) -> torch.Tensor:
    r, g, b = unit_images.unbind(dim=1)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b)[:, None]


def brightness(
    images: torch.Tensor, strength: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Multiply [0, 1] intensities by ``strength`` (a blend with black), then clamp."""
    _check_images(images)
    factor = _check_factor("brightness", strength)
    return from_unit(to_unit(images, clamp=False) * factor)


def contrast(images: torch.Tensor, strength: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Blend each image with its mean grey level: ``factor * x + (1 - factor) * mean(gray(x))``."""
    _check_images(images)
    factor = _check_factor("contrast", strength)
    unit = to_unit(images, clamp=False)
    mean = _grayscale(unit).mean(dim=(1, 2, 3), keepdim=True)
    return from_unit(factor * unit + (1 - factor) * mean)


def saturation(
    images: torch.Tensor, strength: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Blend each image with its greyscale version: ``factor * x + (1 - factor) * gray(x)``."""
    _check_images(images)
    factor = _check_factor("saturation", strength)
    unit = to_unit(images, clamp=False)
    return from_unit(factor * unit + (1 - factor) * _grayscale(unit))


def combined(
    images: torch.Tensor, strength: float | None = None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Stable Signature's combined edit: crop keeping 50% of the area -> brightness 1.5 -> JPEG 80.

    ``strength`` is ignored: the combination is one fixed point of comparison with the peers, not
    a family (it has no identity, since JPEG has none). The crop position comes from ``generator``.
    """
    _check_images(images)
    return jpeg(brightness(crop_resize(images, 0.5, generator), 1.5), 80)


def mirror(
    images: torch.Tensor, strength: float | None = None, generator: torch.Generator | None = None
) -> torch.Tensor:
    """A left-right mirror: free, lossless and invisible to anyone who has not seen the original.
    ``strength`` is ignored (one fixed edit, as :func:`combined`)."""
    _check_images(images)
    return images.flip(-1)


@torch.no_grad()
def regenerate(
    images: torch.Tensor, vae: nn.Module, sample: bool = False, generator: torch.Generator | None = None
) -> torch.Tensor:
    """One VAE encode/decode round trip (WAVES' regeneration attack) with a diffusers-style VAE.

    Parameters:
        images: ``[B, 3, H, W]`` in ``[-1, 1]``.
        vae: an ``AutoencoderKL`` (anything with ``encode(x).latent_dist`` and ``decode(z).sample``),
            typically a public VAE the attacker holds, not the fingerprinted copy.
        sample: decode a sample of the posterior instead of its mode (then ``generator`` is used).

    The VAE's training mode is left as it was; images are moved to its device and dtype and the
    result comes back in the input's.
    """
    _check_images(images)
    parameter = next(vae.parameters())
    with evaluating(vae):
        x = images.to(parameter.device, parameter.dtype)
        posterior = vae.encode(x).latent_dist
        if sample:
            noise = torch.randn(posterior.mean.shape, generator=generator, dtype=posterior.mean.dtype)
            latents = posterior.mean + posterior.std * noise.to(posterior.mean.device)
        else:
            latents = posterior.mode()
        out = vae.decode(latents).sample
    return out.to(images.device, images.dtype).clamp(-1, 1)


def regeneration_attack(vae: nn.Module) -> ImageAttack:
    """The regeneration attack with the common signature: ``strength`` = number of round trips
    (a non-negative integer; 0 is the identity). Deterministic (posterior mode)."""

    def regeneration(
        images: torch.Tensor, strength: float = 1, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        rounds = int(strength)
        if rounds != strength or rounds < 0:
            raise ConfigError(f"regeneration strength is a number of round trips >= 0, got {strength}")
        out = images.clone()
        for _ in range(rounds):
            out = regenerate(out, vae)
        return out

    return regeneration


IMAGE_ATTACKS: dict[str, ImageAttack] = {
    "jpeg": jpeg,
    "crop": crop,
    "crop_resize": crop_resize,
    "shift": shift,
    "resize": resize,
    "rotation": rotation,
    "gaussian_blur": gaussian_blur,
    "gaussian_noise": gaussian_noise,
    "brightness": brightness,
    "contrast": contrast,
    "saturation": saturation,
    "combined": combined,
    "mirror": mirror,
}

# Image attacks that are one fixed edit: their cases name no strength ("combined", "mirror_c1").
FIXED_EDITS: frozenset[str] = frozenset({"combined", "mirror"})

# Attacks whose output is smaller than their input (quality metrics compare it with the same cut of
# the reference image).
SIZE_CHANGING: frozenset[str] = frozenset({"crop", "shift"})

# The strength at which an attack returns its input (only where one exists: not jpeg or combined).
IDENTITY_STRENGTH: dict[str, float] = {
    "crop": 1.0,
    "crop_resize": 1.0,
    "shift": 0,
    "resize": 1.0,
    "rotation": 0.0,
    "gaussian_blur": 0.0,
    "gaussian_noise": 0.0,
    "brightness": 1.0,
    "contrast": 1.0,
    "saturation": 1.0,
    "regeneration": 0,
}

# Grids from the peers' evaluations: WAVES (An et al. 2024), Stable Signature (Fernandez et al.
# 2023), WOUAF (Kim et al. 2024).
DEFAULT_STRENGTHS: dict[str, tuple[float, ...]] = {
    "jpeg": (90, 80, 70, 50, 30, 10),
    "crop": (0.9, 0.5, 0.1),
    "crop_resize": (0.9, 0.5, 0.1),
    "shift": (1, 2, 4, 8),
    "resize": (0.75, 0.5, 0.25),
    "rotation": (10, 20, 25, 30, 90),
    "gaussian_blur": (1.0, 2.0, 3.0),
    "gaussian_noise": (0.05, 0.1, 0.2),
    "brightness": (0.7, 1.3, 1.5, 2.0),
    "contrast": (0.7, 1.3, 1.5, 2.0),
    "saturation": (0.7, 1.3, 1.5, 2.0),
    "combined": (1.0,),
    "mirror": (1.0,),
    "regeneration": (1,),
}


def get_image_attack(name: str, vae: nn.Module | None = None) -> ImageAttack:
    """The attack called ``name`` with the common signature; ``"regeneration"`` needs ``vae``."""
    if name == "regeneration":
        if vae is None:
            raise ConfigError("the regeneration attack needs a VAE to encode and decode with")
        return regeneration_attack(vae)
    if name not in IMAGE_ATTACKS:
        known = ", ".join([*IMAGE_ATTACKS, "regeneration"])
        raise ConfigError(f"unknown image attack {name!r}; expected one of {known}")
    return IMAGE_ATTACKS[name]
