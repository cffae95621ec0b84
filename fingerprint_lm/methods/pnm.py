"""``method=pnm``: the fingerprint lives only in stock ``AutoencoderKL`` weights.

The private mapping network turns a code into the affine weight/bias of the decoder's GroupNorms
(``pnm.affine_sites``; no spatial carrier), so a user's copy is a plain diffusers folder and
``AutoencoderKL.from_pretrained(copy)`` is the user's fingerprinted decoder. A per-channel change
is the same everywhere in the image, so it is read by a shift-invariant extractor
(:mod:`fingerprint_lm.models.pooled_extractor`), whitened on unmarked images after training so that
threshold 0 is valid and unmarked images give balanced bits.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from fingerprint_lm.errors import ConfigError
from fingerprint_lm.methods.base import FingerprintMethod, collect_images
from fingerprint_lm.models.pooled_extractor import WhitenedReader


@dataclass
class PNMMethod(FingerprintMethod):
    """Stock-weight PNM. ``detector_fit_samples``: unmarked images the extractor is whitened on."""

    detector_fit_samples: int = 2048
    stock_copies: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pnm.get("spatial_site") is not None:
            raise ConfigError("method=pnm keeps the fingerprint in stock weights: method.pnm.spatial_site must be null")
        if self.detector_fit_samples <= 0:
            raise ConfigError("method=pnm whitens its extractor: method.detector_fit_samples must be positive")
        if self.extractor.get("kind", "tiled") == "tiled":
            raise ConfigError("method=pnm needs a shift-invariant extractor: method.extractor.kind pooled or band_energy")

    def before_fit(self, module, loader: Iterable) -> dict[str, Any]:
        # A fixed reader is standardised before training, so that its logits mean something at step 0.
        if self.extractor.get("kind") == "band_energy":
            whiten(module, collect_images(loader, self.detector_fit_samples))
        return {}

    def after_fit(self, module, loader: Iterable) -> dict[str, Any]:
        whiten(module, collect_images(loader, self.detector_fit_samples))
        return {}


@torch.no_grad()
def whiten(module, images: torch.Tensor, batch_size: int = 256) -> None:
    """Fit the extractor's whitening on the base decoder's (unmarked) outputs of ``images``."""
    extractor = module.extractor
    if not isinstance(extractor, WhitenedReader):
        raise ConfigError(f"{type(extractor).__name__} has no whitening")
    unmarked = torch.cat([module.pnm(module.encode(chunk.to(module.device)), None).float()
                          for chunk in images.split(batch_size)])
    extractor.fit_whitening(unmarked)
