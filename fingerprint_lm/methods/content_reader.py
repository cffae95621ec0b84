"""pnm's last training stage: fit the distributor's content-dividing reader
(:class:`~fingerprint_lm.models.content_reader.ContentRatioReader`) to a trained model, from the
training stream, with its decoder and its band reader unchanged. The model then reads found images
with it (``FingerprintModel.reader``); the band reader stays the one training uses.

``method.content_reader`` (conf/method/pnm.yaml) holds the settings; a shipped checkpoint gets the
same fit with ``python experiments/fit_content_reader.py <checkpoint>``."""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from fingerprint_lm.attacks.cases import ROBUSTNESS_SUITE, image_case
from fingerprint_lm.errors import ConfigError, DataError, check_float, check_int
from fingerprint_lm.models.batched import evaluating
from fingerprint_lm.models.content_reader import READ_STATISTICS, content_reader_from, fit_readout
from fingerprint_lm.models.pooled_extractor import BandEnergyExtractor
from fingerprint_lm.models.vae import decode_latents, encode_latents
from fingerprint_lm.pixels import from_uint8, to_uint8

CONTENT_READER_KEYS = ("train_images", "unmarked_images", "calibration_images", "steps", "seed", "attack_weight",
                       "statistics", "cycle_statistics")
STATISTICS_KEYS = ("statistics", "cycle_statistics")  # models/content_reader.py: READ_STATISTICS
# what the readout is also trained under (attack_weight > 0): the robustness suite the sweep and the
# training probes score but contrast 1.5 (added to the suite after the shipped reader was fitted; left
# out so that a refit draws what the shipped one drew, and contrast stays an attack the reader never
# saw), the i-th training image under the (i mod 11)-th attack, with seeds of its own
READOUT_ATTACKS = tuple(case for case in ROBUSTNESS_SUITE if case != "contrast_1.5")


def check_content_reader_settings(settings: dict[str, Any], fingerprint_bits: int | None = None) -> dict[str, Any]:
    """``method.content_reader`` checked (integers, ``attack_weight`` a number >= 0, the statistics
    names of :data:`READ_STATISTICS`): unknown keys and bad values are refused by name."""
    unknown = sorted(set(settings) - set(CONTENT_READER_KEYS))
    if unknown:
        raise ConfigError(f"method.content_reader: unknown key(s) {', '.join(unknown)} "
                        f"(known: {', '.join(CONTENT_READER_KEYS)})")
    numbers = [key for key in CONTENT_READER_KEYS if key in settings and key not in ("attack_weight", *STATISTICS_KEYS)]
    checked: dict[str, Any] = {key: check_int(f"method.content_reader.{key}", settings[key], 0 if key == "seed" else 1)
                               for key in numbers}
    if "attack_weight" in settings:
        checked["attack_weight"] = check_float("method.content_reader.attack_weight", settings["attack_weight"], 0)
    for key in STATISTICS_KEYS:
        if key in settings:
            if settings[key] not in READ_STATISTICS:
                raise ConfigError(f"method.content_reader.{key} must be one of {', '.join(READ_STATISTICS)}, "
                                  f"got {settings[key]!r}")
            checked[key] = settings[key]
    if fingerprint_bits is not None:  # whitening n reads needs more than n images of each kind
        width = 2 * fingerprint_bits * max(READ_STATISTICS[checked.get(key, "energy")] for key in STATISTICS_KEYS)
        for key in ("train_images", "unmarked_images"):
            if key in checked and checked[key] <= width:
                raise ConfigError(f"method.content_reader.{key} must exceed the {width} numbers the reader "
                                  f"whitens ({2 * fingerprint_bits} a statistic), got {checked[key]}")
    return checked


def fit_settings(settings: dict[str, Any], for_cycle: bool = False) -> dict[str, Any]:
    """The arguments of :func:`fit_content_reader` from ``method.content_reader``: the reader a later
    training cycle's loss reads (``for_cycle``) reads ``cycle_statistics``, the distributor's
    ``statistics`` (each ``energy`` when unset)."""
    chosen = settings.get("cycle_statistics" if for_cycle else "statistics", "energy")
    return {**{k: v for k, v in settings.items() if k not in STATISTICS_KEYS}, "statistics": chosen}


_DEFAULT_FILTER_SIZE = inspect.signature(BandEnergyExtractor).parameters["filter_size"].default


def check_readout_attack_resolution(method, resolution: int) -> None:
    """Refuse, before training, a readout to be trained under :data:`READOUT_ATTACKS` on images too
    small for them: some attack (``shift_8``: ``side - 8`` px) would leave fewer pixels than the
    band reader's filter reads, and the fit, which runs after training, would fail there."""
    settings = getattr(method, "content_reader", None)
    if not settings or settings.get("attack_weight", 0) <= 0:
        return
    filter_size = int((method.extractor.get("band_energy") or {}).get("filter_size", _DEFAULT_FILTER_SIZE))
    if _side_left(resolution) < filter_size:
        needed = next(side for side in itertools.count(filter_size) if _side_left(side) >= filter_size)
        raise ConfigError(f"method.content_reader.attack_weight > 0 trains the readout under the robustness "
                          f"suite's attacks, which needs images of at least {needed} px; data.resolution is "
                          f"{resolution} (set method.content_reader.attack_weight=0)")


def _side_left(side: int) -> int:
    """The smallest image side :data:`READOUT_ATTACKS` leave of a ``side`` x ``side`` image (0 where
    an attack refuses it: a shift of at least the side)."""
    probe = torch.zeros(1, 3, side, side)
    try:
        return min(min(image_case(case)(probe, torch.Generator().manual_seed(0)).shape[-2:])
                   for case in READOUT_ATTACKS)
    except ConfigError:
        return 0


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
                       seed: int = 91, attack_weight: float = 0.0, statistics: str = "energy") -> dict[str, float]:
    """Fit ``model``'s (a :class:`~fingerprint_lm.models.checkpoint.FingerprintModel` with a band
    reader) content reader and set it as ``model.content_reader``. From consecutive images of
    ``image_chunks``: the base decoder's outputs of ``unmarked_images`` whiten the reads; the PNM
    decoder's outputs of ``train_images``, each under its own random code, train the readout; those
    of ``calibration_images`` more fit each bit's slope. Every output is read as 8-bit pixels, as
    found images are. ``attack_weight > 0`` trains the readout on the training images a second
    time, the ``i``-th under the ``(i mod 11)``-th attack of :data:`READOUT_ATTACKS` (every attack
    as often, whatever the batch size), their loss weighted ``attack_weight`` against the clean
    reads' 1 (the codes drawn are the same either way). Returns the fit's figures: the fitted
    reader's bit accuracy (centred and calibrated, as it reads) on its clean training reads, on
    the attacked ones, and on the calibration images, which the readout never trained on."""
    check_int("method.content_reader.steps", steps)
    check_float("method.content_reader.attack_weight", attack_weight, 0)
    reader = content_reader_from(model.extractor, model.unmarked_vae, statistics)
    device = reader.band_weight.device
    k = model.fingerprint_bits
    sizes = {"unmarked": unmarked_images, "train": train_images, "calibration": calibration_images}
    reads: dict[str, list[torch.Tensor]] = {name: [] for name in [*sizes, "attacked"]}
    codes: dict[str, list[torch.Tensor]] = {name: [] for name in sizes}
    generator = torch.Generator().manual_seed(seed)
    attacks = [image_case(case) for case in READOUT_ATTACKS] if attack_weight > 0 else []
    attack_generator = torch.Generator().manual_seed(seed + 1)  # apart: the codes drawn stay the same
    with evaluating(model.vae, model.unmarked_vae, model.pnm, reader), torch.autocast(device.type, enabled=False):
        for name, images in _segments(image_chunks, sizes):
            latents = encode_latents(model.vae, images.to(device))
            if name == "unmarked":
                outputs = decode_latents(model.unmarked_vae, latents)
            else:
                code = torch.randint(0, 2, (len(images), k), generator=generator)
                outputs = model.pnm(latents, code.to(device))
                codes[name].append(code)
            found = from_uint8(to_uint8(outputs.float())).cpu()
            reads[name].append(reader.reads(found.to(device)).cpu())
            if name == "train" and attacks:
                first = sum(len(r) for r in reads["attacked"])  # the training images' running index
                reads["attacked"].append(_attacked_reads(reader, found, attacks, first, attack_generator))
    train_reads, train_codes = torch.cat(reads["train"]), torch.cat(codes["train"])
    marked, marked_codes, weights = train_reads, train_codes, None
    if attacks:
        marked, marked_codes = torch.cat([train_reads, *reads["attacked"]]), train_codes.repeat(2, 1)
        weights = torch.cat([torch.ones(len(train_reads)), torch.full((len(train_reads),), attack_weight)])
    fit_readout(reader, torch.cat(reads["unmarked"]), marked, marked_codes, steps, seed, weights)
    calibration_codes = torch.cat(codes["calibration"])
    logits = reader.logits_from_reads(torch.cat(reads["calibration"]).to(device)).cpu()
    slopes = reader.calibrate_bit_slopes(logits, calibration_codes)
    model.content_reader = reader.eval()
    figures = {"readout_bit_acc": _bit_acc(reader, train_reads, train_codes),
               "calibration_bit_acc": float(((logits > 0).long() == calibration_codes).float().mean()),
               "bit_slope_min": float(slopes.min()), "bit_slope_median": float(slopes.median()),
               "bit_slope_max": float(slopes.max())}
    if attacks:
        figures["attacked_readout_bit_acc"] = _bit_acc(reader, marked[len(train_reads):], train_codes)
    return figures


def _attacked_reads(reader, found: torch.Tensor, attacks: list, first: int,
                    generator: torch.Generator) -> torch.Tensor:
    """Reads of ``found`` images (CPU), the ``j``-th under ``attacks[(first + j) mod len(attacks)]``
    and saved as 8-bit pixels again: one read per image, in order (each attack's images are read
    together, as an attack may change their size)."""
    which = (first + torch.arange(len(found))) % len(attacks)
    out = torch.empty(len(found), reader.read_width)
    for index, attack in enumerate(attacks):
        rows = (which == index).nonzero().squeeze(1)
        if len(rows):
            attacked = from_uint8(to_uint8(attack(found[rows], generator)))
            out[rows] = reader.reads(attacked.to(reader.band_weight.device)).float().cpu()
    return out


def _bit_acc(reader, reads: torch.Tensor, codes: torch.Tensor) -> float:
    """The fitted reader's bit accuracy on ``reads`` of images of ``codes``."""
    logits = reader.logits_from_reads(reads.to(reader.band_weight.device)).cpu()
    return float(((logits > 0).long() == codes).float().mean())
