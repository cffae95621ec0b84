"""``method=carrier``: PNM coefficients plus a tile-periodic carrier bias map (the first design,
kept as a labelled baseline; docs/design.md, "Methods").

The carriers are readable by a least-squares linear reader from step 0, which is what makes this
method train in minutes; the price is a mark that is not part of the stock weights (the bias map
ships as a third file that a plain diffusers load drops) and is tile-aligned (a 1-px shift defeats it).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from fingerprint_lm.errors import ConfigError
from fingerprint_lm.methods.base import FingerprintMethod, collect_images

log = logging.getLogger(__name__)


@dataclass
class CarrierMethod(FingerprintMethod):
    """Calibrates the carriers to the PSNR target and fits the linear reader before training."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.extractor.get("kind", "tiled") != "tiled":
            raise ConfigError("method=carrier reads its carrier tiles with the tiled extractor: drop method.extractor.kind")

    def before_fit(self, module, loader: Iterable) -> dict[str, Any]:
        log.info("carriers calibrated to %.2f dB", module.calibrate_carriers(collect_images(loader, 256)))
        if self.detector_fit_samples > 0:
            module.fit_detector(collect_images(loader, self.detector_fit_samples))
        return {}

    @torch.no_grad()
    def after_fit(self, module, loader: Iterable) -> dict[str, Any]:
        """Whiten the reader's logits for soft-decision attribution on the base decoder's
        (unmarked) outputs of ``detector_fit_samples`` training images (the bits stay raw:
        :meth:`~fingerprint_lm.models.extractor.FingerprintExtractor.fit_soft_whitening`)."""
        if self.detector_fit_samples <= module.extractor.fingerprint_bits:
            log.warning("soft-decision weights left unwhitened: method.detector_fit_samples (%d) must exceed the "
                        "%d bits", self.detector_fit_samples, module.extractor.fingerprint_bits)
            return {"soft_whitened": False}
        images = collect_images(loader, self.detector_fit_samples)
        unmarked = (module.reference(module.encode(chunk.to(module.device))).float()
                    for chunk in images.split(module.calibration_batch_size))
        fit_soft_whitening(module.extractor, unmarked)
        return {"soft_whitened": True}


@torch.no_grad()
def fit_soft_whitening(extractor, unmarked_batches: Iterable[torch.Tensor]) -> None:
    """Fit the carrier reader's soft-decision whitening on batches of unmarked outputs (the base
    decoder's; only the logits are kept), in eval mode: what training's last hook and
    ``experiments/fit_soft_whitening.py`` (for a saved checkpoint) both run."""
    extractor.eval()
    extractor.fit_soft_whitening(torch.cat([extractor(batch).float().cpu() for batch in unmarked_batches]))
