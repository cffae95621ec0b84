"""An image attack shipped as a plug-in, not in the built-in table: the worked example of
``conf/attacks/``. It is registered the way one of your own would be, by naming it with
``_target_`` (README, "Collusion sweep")::

    python -m fingerprint_lm +experiment=collusion_sweep \\
        '+attacks.image.median={_target_:fingerprint_lm.attacks.plugins.median_filter,_partial_:true}' \\
        'sweep.grid.case="median_s3"'

A plug-in has the built-in attacks' signature, ``fn(images, strength, generator=None)`` on
``[B, 3, H, W]`` batches in ``[-1, 1]``, and returns a new batch (fingerprint_lm/attacks/image.py).
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

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
