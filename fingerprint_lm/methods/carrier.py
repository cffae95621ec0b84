"""``method=carrier``: PNM coefficients plus a tile-periodic carrier bias map (the first design,
kept as a labelled baseline; docs/design.md, "Methods").

The carriers are readable by a least-squares linear reader from step 0, which is what makes this
method train in minutes; the price is a mark that is not part of the stock weights (the bias map
ships as a third file that a plain diffusers load drops) and is tile-aligned (a 1-px shift defeats it).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from fingerprint_lm.errors import ConfigError, check_keys, keyword_names
from fingerprint_lm.methods.base import FingerprintMethod, collect_images
from fingerprint_lm.metrics.quality import psnr
from fingerprint_lm.models.extractor import FingerprintExtractor, fold_tiles

log = logging.getLogger(__name__)


@dataclass
class CarrierMethod(FingerprintMethod):
    """Calibrates the carriers to the PSNR target and fits the linear reader before training."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.extractor.get("kind", "tiled") != "tiled":
            raise ConfigError("method=carrier reads its carrier tiles with the tiled extractor: "
                              "drop method.extractor.kind")
        # the tile size is the decoder's (method.pnm.tile_size), handed to the reader by build_extractor
        check_keys("method.extractor", self.extractor,
                   ["kind", *keyword_names(FingerprintExtractor, ("fingerprint_bits", "tile_size", "in_channels"))])

    def before_fit(self, module, loader: Iterable) -> dict[str, Any]:
        log.info("carriers calibrated to %.2f dB", calibrate_carriers(module, collect_images(loader, 256)))
        if self.detector_fit_samples > 0:
            fit_detector(module, collect_images(loader, self.detector_fit_samples))
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
        fit_soft_whitening(module.extractor, module.unmarked_chunks(images))
        return {"soft_whitened": True}


@torch.no_grad()
def calibrate_carriers(module, images: torch.Tensor, margin_db: float = 1.0, rounds: int = 4) -> float:
    """Scale the carrier amplitudes so the marked output sits ``margin_db`` above the module's PSNR
    target before training starts (MSE grows with amplitude squared, so a few rescalings
    converge). Returns the PSNR reached."""
    if module.pnm.spatial_site_name is None:
        return float("nan")
    chunks = images.split(module.calibration_batch_size)
    latents = [module.encode(chunk.to(module.device)) for chunk in chunks]
    base = [module.reference(z) for z in latents]
    bits = [module.random_bits(len(z)) for z in latents]
    reached = float("nan")
    for _ in range(rounds):
        reached = torch.cat([psnr(module.pnm(z, b), ref) for z, b, ref in zip(latents, bits, base)]).mean().item()
        module.pnm.carrier_log_amplitude += (reached - module.psnr_target - margin_db) / 20 * math.log(10)
    return reached


@torch.no_grad()
def fit_detector(module, images: torch.Tensor, batch_size: int | None = None) -> None:
    """Closed-form initialisation of the module's tiled linear reader on fresh fingerprints.

    Outputs are folded to one tile per image as they come (the reader only sees folded
    images): 4096 SD-sized outputs would otherwise be 13 GB."""
    outputs, bits = [], []
    for chunk in images.split(batch_size or module.calibration_batch_size):
        chunk = chunk.to(module.device)
        chunk_bits = module.random_bits(len(chunk))
        outputs.append(fold_tiles(module.pnm(module.encode(chunk), chunk_bits), module.extractor.tile_size))
        bits.append(chunk_bits)
    module.extractor.fit_linear_head(torch.cat(outputs), torch.cat(bits))
    module.detector_fitted.fill_(True)


@torch.no_grad()
def fit_soft_whitening(extractor, unmarked_batches: Iterable[torch.Tensor]) -> None:
    """Fit the carrier reader's soft-decision whitening on batches of unmarked outputs (the base
    decoder's; only the logits are kept), in eval mode: what training's last hook and
    ``experiments/fit_soft_whitening.py`` (for a saved checkpoint) both run."""
    extractor.eval()
    extractor.fit_soft_whitening(torch.cat([extractor(batch).float().cpu() for batch in unmarked_batches]))
