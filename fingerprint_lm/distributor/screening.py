"""Screening codes at issue time: the floors a pnm checkpoint records, and the drawer that keeps them.

How well a pnm copy reads depends mostly on its user's code (0.86-0.97 bit accuracy over 64 codes
of the shipped checkpoint), and the copies that read worst are where clean attribution fails.
A copy's read of 64 probe images predicts its read of other images (correlation 0.98), so the
distributor can decode the probe with a candidate code's decoder before issuing it and draw again
while it reads below a floor: no retraining, one decoder pass per draw (the probe is encoded once)
(``experiments/code_screening.py``). A screened code is uniform only given that it passes, so
attribution divides p-values by the screen's pass rate: the smallest of the registry's count and
the checkpoint's rates (the probe screen's, measured on codes the floor was not fitted on, and its
read predictor's; ``distributor/attribution.py``, :func:`bound_pass_rate`); the floors were
chosen under that corrected bound (``experiments/results/screen_policy.md``: the better half of
probe reads; the best 10% since 2026-12-08, which lifts the mean bits of the kept copies from 0.988
to 0.990 at no visible cost in attribution, ``experiments/results/predicted_screen_policy.md``).

The copy's image quality is screened the same way: the PSNR of the candidate's probe images
against the base decoder's. A code sets most of that too (29.3-30.5 dB over 32 codes of the
shipped checkpoint) and the probe predicts it, so a distributor can promise every user a copy
within a quality floor. With both floors (29.9 dB, the best 10% of codes' reads), 32 stock-loaded
copies of the shipped checkpoint attribute 1.0000 of clean held-out images in each of five
registries at 30.21-30.26 dB mean under the corrected bound (2026-12-08;
``experiments/results/default_condition.md``).

The floors are fitted once per checkpoint (:func:`fit_floors`: the bit floor keeps the best
``keep`` of random codes' probe reads, the PSNR floor is the method's quality target), recorded
in its ``fingerprint.json`` as ``issue_screen``, and used by ``task=issue`` unless the
distributor's settings say otherwise (:func:`screen_floors`) or the checkpoint's read predictor
screens in its place (``distributor/issue_screens.py``: which screen ``task=issue`` and the sweep use).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from fingerprint_lm.distributor.copies import decoder_from_tensors
from fingerprint_lm.distributor.generation import decode_with, held_out_images
from fingerprint_lm.errors import RegistryError, check_float, check_int
from fingerprint_lm.methods.base import personal_tensors
from fingerprint_lm.metrics.quality import psnr
from fingerprint_lm.models import batched
from fingerprint_lm.models.checkpoint import FingerprintModel
from fingerprint_lm.pixels import from_uint8, to_uint8

PROBE_SEED = 101  # the probe's procedural images: the seed experiments/code_screening.py measured with
FIT_SEED = 7  # the candidate codes fit_floors reads: code_screening.py's first seed (floor 0.922 there too)


@torch.no_grad()
def read_logits(model: FingerprintModel, decoder, images: torch.Tensor) -> np.ndarray:
    """The reader's logits (float64) on ``images`` encoded by ``model``'s VAE, decoded by
    ``decoder`` and saved as 8-bit pixels, as a user's images would be."""
    return logits_of(model, decode_with(model.vae, decoder, images))


def logits_of(model: FingerprintModel, decoded: torch.Tensor, device: str | torch.device = "cpu") -> np.ndarray:
    """The reader's logits (float64) on decoder outputs saved as 8-bit pixels, read on ``device``."""
    return batched.extract(model.reader, from_uint8(to_uint8(decoded)), device).double().numpy()


class ProbeReader:
    """Reads a code's decoder on ``probe_images`` fixed images: the share of the code's bits it
    reads back (8-bit pixels, as a user's images would be) and the mean PSNR of its outputs
    against the base decoder's. ACT changes nothing a decoder outputs, so the code's plain PNM
    decoder stands in for the user's copy. Every copy shares the encoder, so the probe is encoded
    once: a draw costs one decoder pass and one read. The decoders and the reader run on ``device``
    (the model stays where it is; results come back to the CPU)."""

    def __init__(self, model: FingerprintModel, probe_images: int = 64, device: str | torch.device = "cpu") -> None:
        self.model, self.device = model, device
        self.images = held_out_images(int(model.meta.get("resolution", 32)), check_int("probe_images", probe_images),
                                      PROBE_SEED)
        with torch.no_grad():
            self.latents = batched.encode(model.vae, self.images, device)
            self.base = batched.decode(model.unmarked_vae, self.latents, device)

    @torch.no_grad()
    def decode(self, code: np.ndarray) -> torch.Tensor:
        """The probe images as ``code``'s decoder outputs them."""
        decoder = decoder_from_tensors(self.model.vae.config, *personal_tensors(self.model, code))
        return batched.decode(decoder, self.latents, self.device)

    def __call__(self, code: np.ndarray) -> tuple[float, float]:
        decoded = self.decode(code)
        accuracy = float(((logits_of(self.model, decoded, self.device) > 0) == np.asarray(code, dtype=bool)).mean())
        return accuracy, float(psnr(decoded, self.base).mean())


def fit_floors(model: FingerprintModel, keep: float = 0.75, min_psnr: float = 30.0, candidates: int = 64,
               probe_images: int = 64, seed: int = FIT_SEED, rate_candidates: int = 128,
               device: str | torch.device = "cpu") -> dict[str, Any]:
    """The ``issue_screen`` record of a checkpoint: ``candidates`` random codes are read on the
    probe, the bit floor keeps the best ``keep`` of them (its ``1 - keep`` quantile), the PSNR floor
    is ``min_psnr``; ``pass_rate`` (:func:`estimate_pass_rate`) is measured on ``rate_candidates``
    other codes, since the floor is a quantile of the first ones' reads and their own share would be
    ``keep`` by construction (the mean draws per issued copy is about its inverse). The probe reads
    run on ``device``."""
    check_float("keep", keep, above=0.0, maximum=1.0)
    check_float("min_psnr", min_psnr, above=0.0)
    reader, rng = ProbeReader(model, probe_images, device), np.random.default_rng(seed)
    reads = np.array([reader(rng.integers(0, 2, model.fingerprint_bits, dtype=np.uint8))
                      for _ in tqdm(range(check_int("candidates", candidates)), desc="screen floor: probe reads",
                                    unit="code", leave=False)])
    floor = round(float(np.quantile(reads[:, 0], 1.0 - keep)), 6)
    return {"min_probe_bit_acc": floor, "min_probe_psnr": float(min_psnr), "keep": float(keep),
            "candidates": int(candidates), "probe_images": int(probe_images), "seed": int(seed),
            **estimate_pass_rate(reader, floor, min_psnr, rate_candidates, seed + 1)}


def estimate_pass_rate(reader: ProbeReader, min_bit_acc: float | None, min_psnr: float | None, codes: int,
                       seed: int) -> dict[str, Any]:
    """The share of ``codes`` random codes (``default_rng(seed)``) whose probe read clears both floors
    (None: not screened on that one): ``pass_rate``, with the codes and seed it was measured on and
    its binomial standard error."""
    rng = np.random.default_rng(seed)
    drawn = (rng.integers(0, 2, reader.model.fingerprint_bits, dtype=np.uint8)
             for _ in range(check_int("rate_candidates", codes)))
    reads = [reader(code) for code in tqdm(drawn, desc="screen pass rate: probe reads", total=codes, unit="code",
                                           leave=False)]
    rate = float(np.mean([clears(accuracy, quality, min_bit_acc, min_psnr) for accuracy, quality in reads]))
    return {"pass_rate": rate, "pass_rate_codes": int(codes), "pass_rate_seed": int(seed),
            "pass_rate_stderr": round(float(np.sqrt(rate * (1.0 - rate) / codes)), 4)}


def clears(accuracy: float, quality: float, min_bit_acc: float | None, min_psnr: float | None) -> bool:
    """Whether a probe read (bit accuracy, mean PSNR) clears both floors (None: not screened on it)."""
    return (min_bit_acc is None or accuracy >= min_bit_acc) and (min_psnr is None or quality >= min_psnr)


def bound_pass_rate(registry_rate: float | None, recorded: dict[str, Any] | None) -> float | None:
    """The screen's pass rate that attribution divides p-values by: the registry's own count
    (``Registry.screen_pass_rate``), or the checkpoint's fitted rates (its ``issue_screen`` record:
    the probe screen's ``pass_rate`` and its read predictor's, ``predictor.pass_rate``) where one is
    smaller, since a registry of few screened users may count it high (one user whose first draw
    passed counts 1) and the registry does not record which screen kept each code. None when the
    registry screened no code."""
    if registry_rate is None:
        return None
    recorded = recorded or {}
    fitted = [float(rate) for rate in (recorded.get("pass_rate"), (recorded.get("predictor") or {}).get("pass_rate"))
              if rate is not None]
    return min([registry_rate, *fitted])


def screen_floors(recorded: dict[str, Any] | None, screen_codes: bool, min_bit_acc: float | None,
                  min_psnr: float | None) -> tuple[float | None, float | None]:
    """The floors ``task=issue`` keeps: none when ``screen_codes`` is false, else each distributor
    setting that is set, and the checkpoint's ``recorded`` floor (``issue_screen``) where it is not."""
    if not screen_codes:
        return None, None
    recorded = recorded or {}
    return (recorded.get("min_probe_bit_acc") if min_bit_acc is None else min_bit_acc,
            recorded.get("min_probe_psnr") if min_psnr is None else min_psnr)


class CodeScreen:
    """A code drawer for :func:`~fingerprint_lm.distributor.copies.issue_copy`: draws codes with
    ``registry.new_code`` until one's decoder reads at least ``min_bit_acc`` of its bits on the
    probe images and, when ``min_psnr`` is set, decodes them at least that close to the base
    decoder (mean PSNR, dB), at most ``max_draws`` times. Either floor may be None (not screened),
    not both. After a draw, ``probe_bit_acc``, ``probe_psnr`` and ``draws`` say how the issued
    code read and what it took."""

    def __init__(self, model: FingerprintModel, registry, min_bit_acc: float | None, probe_images: int = 64,
                 max_draws: int = 200, min_psnr: float | None = None) -> None:
        if min_bit_acc is None and min_psnr is None:
            raise ValueError("CodeScreen needs min_bit_acc or min_psnr")
        self.registry = registry
        self.min_bit_acc = (None if min_bit_acc is None else
                            check_float("distributor.min_probe_bit_acc", min_bit_acc, above=0.0, maximum=1.0))
        self.min_psnr = None if min_psnr is None else check_float("distributor.min_probe_psnr", min_psnr, above=0.0)
        self.max_draws = check_int("max_draws", max_draws)
        self.read = ProbeReader(model, probe_images)
        self.images = self.read.images
        self.probe_bit_acc: float | None = None
        self.probe_psnr: float | None = None
        self.draws = 0

    def passes(self, accuracy: float, quality: float) -> bool:
        return clears(accuracy, quality, self.min_bit_acc, self.min_psnr)

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        best_acc, best_psnr = 0.0, 0.0
        for draws in range(1, self.max_draws + 1):
            code = self.registry.new_code(rng)
            accuracy, quality = self.read(code)
            if self.passes(accuracy, quality):
                self.probe_bit_acc, self.probe_psnr, self.draws = accuracy, quality, draws
                return code
            best_acc, best_psnr = max(best_acc, accuracy), max(best_psnr, quality)
        floors = " and ".join(f for f in (
            None if self.min_bit_acc is None else f"read >= {self.min_bit_acc} of its bits (best {best_acc:.3f})",
            None if self.min_psnr is None else f"decoded >= {self.min_psnr} dB (best {best_psnr:.2f})") if f)
        raise RegistryError(f"no code among {self.max_draws} draws {floors} on the probe images: lower "
                            "distributor.min_probe_bit_acc or distributor.min_probe_psnr, or set "
                            "distributor.screen_codes=false")
