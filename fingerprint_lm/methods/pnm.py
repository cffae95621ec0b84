"""``method=pnm``: the fingerprint lives only in stock ``AutoencoderKL`` weights.

The private mapping network turns a code into the affine weight/bias of the decoder's GroupNorms
(``pnm.affine_sites``; no spatial carrier), so a user's copy is a plain diffusers folder and
``AutoencoderKL.from_pretrained(copy)`` is the user's fingerprinted decoder. A per-channel change
is the same everywhere in the image, so it is read by a shift-invariant extractor
(:mod:`fingerprint_lm.models.pooled_extractor`), whitened on unmarked images after training so that
threshold 0 is valid and unmarked images give balanced bits, then (``bit_calibration_images``)
calibrated per bit on marked images, so that soft attribution weighs each bit by how reliably it
reads.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from fingerprint_lm.errors import ConfigError, check_int, check_keys, keyword_names
from fingerprint_lm.methods.base import FingerprintMethod, collect_images, image_batches
from fingerprint_lm.models.batched import evaluating
from fingerprint_lm.models.extractor import EXTRACTOR_KINDS
from fingerprint_lm.models.pooled_extractor import BandEnergyExtractor, PooledExtractor, WhitenedReader
from fingerprint_lm.models.vae import encode_latents


@dataclass
class PNMMethod(FingerprintMethod):
    """Stock-weight PNM. ``detector_fit_samples``: unmarked images the extractor is whitened on
    (a fixed ``band_energy`` reader before and after training, a learned ``pooled`` one after).
    ``bit_calibration_images``: marked images (each with its own random code) each bit's logistic
    slope is fitted on after training (:func:`calibrate_bits`; 0: none)."""

    detector_fit_samples: int = 2048
    bit_calibration_images: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.extractor.get("kind", "tiled") not in EXTRACTOR_KINDS:
            raise ConfigError(f"unknown extractor kind {self.extractor.get('kind')!r} "
                              "(choose one of: pooled, band_energy)")
        if self.pnm.get("spatial_site") is not None:
            raise ConfigError("method=pnm keeps the fingerprint in stock weights: method.pnm.spatial_site must be null")
        check_int("method=pnm whitens its extractor: method.detector_fit_samples", self.detector_fit_samples)
        check_int("method.bit_calibration_images", self.bit_calibration_images, 0)
        if self.extractor.get("kind", "tiled") == "tiled":
            raise ConfigError("method=pnm needs a shift-invariant extractor: "
                              "method.extractor.kind pooled or band_energy")
        check_keys("method.extractor", self.extractor, ("kind", "pooled", "band_energy"))
        for kind, reader in (("pooled", PooledExtractor), ("band_energy", BandEnergyExtractor)):
            check_keys(f"method.extractor.{kind}", self.extractor.get(kind) or {},
                       keyword_names(reader, ("fingerprint_bits", "in_channels")))

    def build_model(self, vae, fingerprint_bits: int):
        if self.detector_fit_samples <= fingerprint_bits:  # fail before training, not after it
            raise ConfigError(
                f"whitening {fingerprint_bits} logits needs method.detector_fit_samples > {fingerprint_bits}, "
                f"got {self.detector_fit_samples}"
            )
        return super().build_model(vae, fingerprint_bits)

    def before_fit(self, module, loader: Iterable) -> dict[str, Any]:
        # A fixed reader is standardised before training, so that its logits mean something at step 0.
        if self.extractor.get("kind") == "band_energy":
            whiten(module, collect_images(loader, self.detector_fit_samples))
        return {}

    def prepare_training(self, module, loader: Iterable) -> None:
        # A reader whose filters train is re-whitened during training (module.rewhiten_every, or
        # once when it freezes for the warm-down), or held white by module.whiteness_weight's
        # penalty, on the same unmarked outputs after_fit whitens on; kept on the CPU (2048
        # SD-sized outputs are 1.6 GB).
        if module.rewhitens_in_training and any(p.requires_grad for p in module.extractor.parameters()):
            module.whitening_outputs = unmarked_outputs(module, collect_images(loader, self.detector_fit_samples))

    def after_fit(self, module, loader: Iterable) -> dict[str, Any]:
        if module.whitening_outputs is not None:  # decoded once already (prepare_training): reuse them
            module.refresh_whitening()
        else:
            whiten(module, collect_images(loader, self.detector_fit_samples))
        module.whitening_outputs = None
        if not self.bit_calibration_images:
            return {}
        return calibrate_bits(module, image_batches(loader, self.bit_calibration_images))


@torch.no_grad()
def calibrate_bits(model, image_chunks: Iterable[torch.Tensor], seed: int = 0) -> dict[str, float]:
    """Decode each chunk of images with ``model``'s PNM decoder (a training module or a loaded
    :class:`~fingerprint_lm.models.checkpoint.FingerprintModel`), each image under its own random
    code (``seed``), and scale each bit of the reader by its logistic slope on the whitened logits
    (:meth:`~fingerprint_lm.models.pooled_extractor.WhitenedReader.calibrate_bit_slopes`); only the
    logits are kept (4096 SD-sized images would be 13 GB). The distributor's own codes, never
    registered: soft p-values stay exact, since the weights depend only on the image. Returns the
    slopes' range, which training records in its metrics."""
    extractor = model.extractor
    if not isinstance(extractor, WhitenedReader):
        raise ConfigError(f"{type(extractor).__name__} has no whitening to calibrate")
    device = extractor.whiten_mean.device
    generator = torch.Generator().manual_seed(seed)
    logits, bits = [], []
    with evaluating(model.pnm, extractor), torch.autocast(device.type, enabled=False):
        for chunk in image_chunks:
            code = torch.randint(0, 2, (len(chunk), extractor.fingerprint_bits), generator=generator)
            latents = encode_latents(model.vae, chunk.to(device))
            logits.append(extractor(model.pnm(latents, code.to(device)).float()).float().cpu())
            bits.append(code)
    slopes = extractor.calibrate_bit_slopes(torch.cat(logits), torch.cat(bits))
    return {"bit_slope_min": float(slopes.min()), "bit_slope_median": float(slopes.median()),
            "bit_slope_max": float(slopes.max())}


@torch.no_grad()
def unmarked_outputs(module, images: torch.Tensor) -> torch.Tensor:
    """The reference decoder's outputs of ``images`` (float32, on the CPU), decoded
    ``module.calibration_batch_size`` at a time on the module's device."""
    return torch.cat([chunk.cpu() for chunk in module.unmarked_chunks(images)])


@torch.no_grad()
def whiten(module, images: torch.Tensor) -> None:
    """Fit the extractor's whitening on the base decoder's (unmarked) outputs of ``images``,
    decoded ``module.calibration_batch_size`` at a time on the module's device; only the raw
    logits are kept (2048 SD-sized images would be 6 GB). The base is the decoder as it was
    (``module.reference``): with a trained shared decoder, unmarked images in the wild come from
    the original model, not from the shared decoder nobody receives."""
    extractor = module.extractor
    if not isinstance(extractor, WhitenedReader):
        raise ConfigError(f"{type(extractor).__name__} has no whitening")
    extractor.fit_whitening_chunks(module.unmarked_chunks(images))
