"""pnm's last training stage: fit the distributor's content-dividing reader
(:class:`~fingerprint_lm.models.content_reader.ContentRatioReader`) to a trained model, from the
training stream, with its decoder and its band reader unchanged. The model then reads found images
with it (``FingerprintModel.reader``); the band reader stays the one training uses.

``method.content_reader`` (conf/method/pnm.yaml) holds the settings; a shipped checkpoint gets the
same fit with ``python experiments/fit_content_reader.py <checkpoint>``."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch

from fingerprint_lm.errors import ConfigError, DataError, check_int
from fingerprint_lm.models.batched import evaluating
from fingerprint_lm.models.content_reader import content_reader_from, fit_readout
from fingerprint_lm.models.vae import encode_latents
from fingerprint_lm.pixels import from_uint8, to_uint8

CONTENT_READER_KEYS = ("train_images", "unmarked_images", "calibration_images", "steps", "seed")


def check_content_reader_settings(settings: dict[str, Any], fingerprint_bits: int | None = None) -> dict[str, int]:
    """``method.content_reader`` as checked integers: unknown keys and bad values are refused by name."""
    unknown = sorted(set(settings) - set(CONTENT_READER_KEYS))
    if unknown:
        raise ConfigError(f"method.content_reader: unknown key(s) {', '.join(unknown)} "
                        f"(known: {', '.join(CONTENT_READER_KEYS)})")
    checked = {key: check_int(f"method.content_reader.{key}", settings[key], 0 if key == "seed" else 1)
               for key in CONTENT_READER_KEYS if key in settings}
    if fingerprint_bits is not None:  # whitening 2k reads needs more than 2k images of each kind
        for key in ("train_images", "unmarked_images"):
            if key in checked and checked[key] <= 2 * fingerprint_bits:
                raise ConfigError(f"method.content_reader.{key} must exceed twice the fingerprint length "
                                f"({2 * fingerprint_bits}), got {checked[key]}")
    return checked


def _segments(chunks: Iterable[torch.Tensor], sizes: dict[str, int]) -> Iterator[tuple[str, torch.Tensor]]:
    """Consecutive, disjoint runs of ``sizes[name]`` images from a stream of image batches, cut at
    the batch boundaries they fall on: ``(name, part of a batch)``."""
    order = iter(sizes.items())
    name, left = next(order)
    for chunk in chunks:
        while len(chunk):
            part, chunk = chunk[:left], chunk[left:]
            left -= len(part)
            yield name, part
            if left == 0:
                following = next(order, None)
                if following is None:
                    return
                name, left = following
    raise DataError(f"the content reader's fit ran out of training images ({sum(sizes.values())} wanted)")


@torch.no_grad()
def fit_content_reader(model, image_chunks: Iterable[torch.Tensor], train_images: int = 8192,
                       unmarked_images: int = 2048, calibration_images: int = 4096, steps: int = 1500,
                       seed: int = 91) -> dict[str, float]:
    """Fit ``model``'s (a :class:`~fingerprint_lm.models.checkpoint.FingerprintModel` with a band
    reader) content reader and set it as ``model.content_reader``. From consecutive images of
    ``image_chunks``: the base decoder's outputs of ``unmarked_images`` whiten the reads; the PNM
    decoder's outputs of ``train_images``, each under its own random code, train the readout; those
    of ``calibration_images`` more fit each bit's slope. Every output is read as 8-bit pixels, as
    found images are. Returns the fit's figures (the calibration images' bit accuracy is held out
    from the readout's training)."""
    check_int("method.content_reader.steps", steps)
    reader = content_reader_from(model.extractor, model.unmarked_vae)
    device = reader.band_weight.device
    k = model.fingerprint_bits
    sizes = {"unmarked": unmarked_images, "train": train_images, "calibration": calibration_images}
    reads: dict[str, list[torch.Tensor]] = {name: [] for name in sizes}
    codes: dict[str, list[torch.Tensor]] = {name: [] for name in sizes}
    generator = torch.Generator().manual_seed(seed)
    with evaluating(model.vae, model.unmarked_vae, model.pnm, reader), torch.autocast(device.type, enabled=False):
        for name, images in _segments(image_chunks, sizes):
            latents = encode_latents(model.vae, images.to(device))
            if name == "unmarked":
                outputs = model.unmarked_vae.decode(latents).sample
            else:
                code = torch.randint(0, 2, (len(images), k), generator=generator)
                outputs = model.pnm(latents, code.to(device))
                codes[name].append(code)
            reads[name].append(reader.reads(from_uint8(to_uint8(outputs.float())).to(device)).cpu())
    train_reads, train_codes = torch.cat(reads["train"]), torch.cat(codes["train"])
    readout_bit_acc = fit_readout(reader, torch.cat(reads["unmarked"]), train_reads, train_codes, steps, seed)
    calibration_reads, calibration_codes = torch.cat(reads["calibration"]), torch.cat(codes["calibration"])
    logits = reader.logits_from_reads(calibration_reads.to(device)).cpu()
    slopes = reader.calibrate_bit_slopes(logits, calibration_codes)
    model.content_reader = reader.eval()
    return {"readout_bit_acc": readout_bit_acc,
            "calibration_bit_acc": float(((logits > 0).long() == calibration_codes).float().mean()),
            "bit_slope_min": float(slopes.min()), "bit_slope_median": float(slopes.median()),
            "bit_slope_max": float(slopes.max())}
