"""The one conversion between the models' images and pixels.

Every model in the package takes and returns float images in ``[-1, 1]``, channels first
(``[B, 3, H, W]``, as diffusers' VAEs do). Files, PIL and JPEG hold 8-bit RGB, channels last.
Every crossing between the two goes through this module, so a saved PNG, a real JPEG attack and a
COCO image read back all quantise and rescale the same way:

- :func:`to_uint8`: clip to ``[-1, 1]``, ``(x + 1) * 127.5``, round half to even, ``uint8``;
- :func:`from_uint8`: ``p / 127.5 - 1`` in float32 (exactly inverts :func:`to_uint8` on its
  256 levels up to float rounding);
- :func:`to_unit` / :func:`from_unit`: ``[-1, 1]`` <-> ``[0, 1]`` for metrics and photometric
  attacks (clamped, as a saved image would be);
- :func:`to_byte_scale` / :func:`from_byte_scale`: ``[-1, 1]`` <-> ``[0, 255]`` as unrounded
  floats, for differentiable simulations of 8-bit codecs.
"""

from __future__ import annotations

import numpy as np
import torch


def to_unit(images: torch.Tensor, clamp: bool = True) -> torch.Tensor:
    """``[-1, 1]`` -> ``[0, 1]``, clamped unless ``clamp=False`` (photometric attacks act on the
    decoder's unclipped values and clip once, at the end: :func:`from_unit`)."""
    unit = (images + 1) / 2
    return unit.clamp(0, 1) if clamp else unit


def from_unit(images: torch.Tensor) -> torch.Tensor:
    """``[0, 1]`` (clamped) -> ``[-1, 1]``, contiguous."""
    return (images.clamp(0, 1) * 2 - 1).contiguous()


def to_byte_scale(images: torch.Tensor) -> torch.Tensor:
    """``[-1, 1]`` -> ``[0, 255]`` as floats, neither rounded nor clamped: differentiable, for
    simulations of 8-bit codecs (models.augment.jpeg_like)."""
    return (images + 1) * 127.5


def from_byte_scale(values: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`to_byte_scale`."""
    return values / 127.5 - 1


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """``[..., 3, H, W]`` images in ``[-1, 1]`` -> 8-bit RGB ``uint8 [..., H, W, 3]`` on the CPU."""
    pixels = to_byte_scale(images.detach().clamp(-1, 1)).round().to(torch.uint8)
    return np.ascontiguousarray(pixels.movedim(-3, -1).cpu().numpy())


def from_uint8(pixels: np.ndarray, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """8-bit RGB ``[..., H, W, 3]`` -> ``[..., 3, H, W]`` images in ``[-1, 1]`` of ``dtype``."""
    # a PIL image's array is read-only: torch wants its own writable copy then
    tensor = torch.from_numpy(np.require(pixels, np.uint8, ["C_CONTIGUOUS", "WRITEABLE"])).movedim(-1, -3)
    return from_byte_scale(tensor.to(dtype)).contiguous()
