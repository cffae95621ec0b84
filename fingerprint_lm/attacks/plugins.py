"""Attacks shipped as plug-ins, not in the built-in tables: the worked examples of
``conf/attacks/``. Each is registered the way one of your own would be, by naming it with
``_target_`` (README, "Collusion sweep")::

    python -m fingerprint_lm +experiment=collusion_sweep \\
        '+attacks.image.median={_target_:fingerprint_lm.attacks.plugins.median_filter,_partial_:true}' \\
        'sweep.grid.case="median_s3"'

Four kinds, each with the built-in attacks' signature and returning new tensors:

- ``attacks.image.<name>``: ``fn(images, strength, generator=None)`` on ``[B, 3, H, W]`` batches
  in ``[-1, 1]`` (fingerprint_lm/attacks/image.py); cases ``<name>_<strength>``.
- ``attacks.model.<name>``: ``fn(state_dict, strength, generator=None)`` on one copy's VAE
  tensors (fingerprint_lm/attacks/model.py); cases ``<name>[_<strength>]``.
- ``attacks.merge.<name>``: ``fn(state_dicts, generator=None)`` on the c colluders' copies
  (fingerprint_lm/attacks/collusion.py); cases ``<name>_c<N>``. Example: :func:`median_merge`.
- ``attacks.image_merge.<name>``: ``fn(outputs, generator=None)`` on the c colluders' images of
  the same content (one ``[n, 3, H, W]`` batch each), returning one such batch; cases
  ``<name>_c<N>``, like ``image_mix`` and ``image_blend``.

The collusion sweep checks what a plug-in returns (:func:`checked_state_output`,
:func:`check_image_merge_output`) before it rebuilds a decoder or scores images from it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch.nn import functional as F

from fingerprint_lm.attacks.collusion import elementwise_merge
from fingerprint_lm.errors import ConfigError


def median_filter(images: torch.Tensor, strength: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-channel median over a ``strength`` x ``strength`` window (odd, >= 1; reflected borders):
    a classic removal attack on high-frequency marks that keeps edges sharper than a blur."""
    size = int(strength)
    if size != strength or size < 1 or size % 2 == 0:
        raise ConfigError(f"median_filter needs an odd window size >= 1, got {strength}")
    if size == 1:
        return images.clone()
    b, c, h, w = images.shape
    padded = F.pad(images, (size // 2,) * 4, mode="reflect")
    windows = F.unfold(padded.reshape(b * c, 1, *padded.shape[-2:]), size)  # [b*c, size*size, h*w]
    return windows.median(dim=1).values.reshape(b, c, h, w)


def median_merge(
    state_dicts: Sequence[Mapping[str, torch.Tensor]], generator: torch.Generator | None = None
) -> dict[str, torch.Tensor]:
    """The colluders' copies merged by the element-wise median of every floating-point tensor
    (integer buffers from the first copy): a robust-statistics merge that, unlike the mean,
    ignores one colluder's outlying weights. For two copies it is their mean (torch's median takes
    the lower value, so this averages the two middle ones itself)."""
    if len(state_dicts) < 2:
        raise ConfigError(f"median_merge needs at least 2 copies, got {len(state_dicts)}")

    def median(stack: torch.Tensor) -> torch.Tensor:
        ordered, middle = stack.sort(dim=0).values, len(stack) // 2
        return ordered[middle] if len(stack) % 2 else (ordered[middle - 1] + ordered[middle]) / 2

    return elementwise_merge(state_dicts, median)


def checked_state_output(name: str, out, reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A plug-in's state dict, refused (one ConfigError) unless it has the copy's keys and shapes:
    the decoder is rebuilt from it, and a stray or missing key would end in a traceback there."""
    if not isinstance(out, dict):
        raise ConfigError(f"attack plug-in {name!r} returned {type(out).__name__}, not a state dict")
    if out.keys() != reference.keys():
        missing, extra = sorted(reference.keys() - out.keys()), sorted(out.keys() - reference.keys())
        raise ConfigError(f"attack plug-in {name!r} changed the state dict's keys (missing {missing[:3]}, "
                          f"extra {extra[:3]}); return every key it was given")
    for key, value in reference.items():
        if not isinstance(out[key], torch.Tensor) or out[key].shape != value.shape:
            raise ConfigError(f"attack plug-in {name!r} returned {key} with another shape than {tuple(value.shape)}")
    return dict(out)


def check_image_merge_output(name: str, outputs, like: torch.Tensor) -> None:
    """An image-collusion plug-in's result, refused (one ConfigError) unless it is one batch shaped
    like each colluder's."""
    if not isinstance(outputs, torch.Tensor) or outputs.shape != like.shape:
        raise ConfigError(f"image collusion plug-in {name!r} must return one batch of shape "
                          f"{tuple(like.shape)}, got {getattr(outputs, 'shape', type(outputs).__name__)}")
