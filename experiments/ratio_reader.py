"""Probe (issue 11): does dividing each image's own content out of pnm's band energies, with a
readout learned under a whiteness constraint, read the shipped copies' marks better, with no
retraining?

pnm's reader (``models/pooled_extractor.py: BandEnergyExtractor``) takes the log energy of each
image in 48 secret bands and whitens it on unmarked images (ZCA); the whitening is its whole
readout. The mark is mostly a gain on the content's own texture in those bands, so the content's
energy is the noise the bits are read against. The distributor holds the base VAE: re-encoding a
found image and decoding it with the base gives the same content without the user's gain, and the
difference of the two log energies (the *ratio* read) leaves the gain (with the trained shared
decoder's drift from the base, the same for every user). Attacks that act on the
whole image (blur, JPEG, brightness) act on the re-encoded image too, so part of their effect
divides out as well.

The readout: the raw reads (``image``: the 48 log energies; ``image+ratio``: those and the 48
ratios) are ZCA-whitened on unmarked images, then mapped to 48 logits by a matrix with
orthonormal rows trained with BCE on marked images of random codes. Any such matrix keeps the
logits white on unmarked images (zero median per bit after a re-centring, identity covariance),
which is what the attribution's null needs; the shipped reader is the ``image`` case with the
identity. A third set of reads, the bands of the residual (image minus re-encoded image), is the
content removed by subtraction instead of division. Each bit's slope is then calibrated on other
users' copies, as training calibrates the shipped reader. Copies and decoder are the shipped
ones: only the distributor's private reader changes, so copies already issued would read with it.

It issues ``--users`` copies (ACT all), decodes ``--images`` held-out images with each, applies
every attack of the robustness suite (8-bit pixels after the attack) and, to the copies' weights,
the sweep's weight noise, pruning and int8 quantisation, and reports bit accuracy
and soft attribution among ``--registry`` users at fpr 1e-6; the base decoder's outputs of
``--null-images`` held-out images (unmarked; the evaluated ones first) must stay unaccused.

    python experiments/ratio_reader.py --users 8 --images 256

Prints markdown tables; ``results/ratio_reader.md`` keeps the run's tables.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from nuisance_projection import (
    CASES,
    check_copies_arguments,
    copies_parser,
    print_tables,
    probe_copies,
    score_reader,
    shipped_read,
)
from soft_attribution import attacked, issue_copies
from torch import nn
from torch.nn.utils.parametrizations import orthogonal

from fingerprint_lm.attacks.cases import ROBUSTNESS_SUITE, parse_case
from fingerprint_lm.attacks.model import STATE_ATTACKS
from fingerprint_lm.distributor.generation import decode_with, held_out_images, training_images
from fingerprint_lm.errors import ConfigError, check_int, exit_on_user_error
from fingerprint_lm.models import batched
from fingerprint_lm.models.checkpoint import load_fingerprint_model, shipped_checkpoint
from fingerprint_lm.models.pooled_extractor import bit_slopes, whitening_map
from fingerprint_lm.pixels import from_uint8, to_uint8

# held-out images (evaluated), whitening (unmarked), the readout's training images (marked with
# random codes), the calibration users' images: four disjoint sets
EVAL_SEED, WHITEN_SEED, TRAIN_SEED, CALIBRATION_SEED = 5, 77, 91, 78
# the sweep's model attacks at their strengths (a fine-tune, which needs the training loop, is left out)
MODEL_CASES = ("weight_noise_0.05", "prune_0.3", "quantize_int8")


@torch.no_grad()
def reads(model, images: torch.Tensor, batch: int = 256) -> np.ndarray:
    """``[n, 3k]``: the shipped reader's raw log band energies of ``images`` (saved as 8-bit
    pixels); the same minus those of the images re-encoded and decoded by the base VAE (the ratio);
    and those of the residual, the images minus their re-encoded version."""
    images = from_uint8(to_uint8(images))
    reencoded = decode_with(model.unmarked_vae, model.unmarked_vae, images)
    h, w = reencoded.shape[-2:]  # a side that is no multiple of the VAE's downscale factor comes back shorter
    raw = [batched.in_batches(model.extractor, lambda m, a: m.raw_logits(a), x, batch_size=batch)
           for x in (images, reencoded, images[..., :h, :w] - reencoded)]
    return torch.cat([raw[0], raw[0] - raw[1], raw[2]], 1).double().numpy()


class OrthogonalReadout:
    """ZCA on unmarked reads, then ``k`` orthonormal rows trained by BCE on marked reads, re-centred
    at the unmarked median, each bit's slope calibrated on marked reads of known codes."""

    def __init__(self, unmarked: np.ndarray, marked: np.ndarray, codes: np.ndarray, steps: int, seed: int,
                 weights: np.ndarray | None = None) -> None:
        centre, matrix = whitening_map(torch.from_numpy(unmarked), "median")
        self.centre, self.matrix = centre.numpy(), matrix.numpy()
        torch.manual_seed(seed)
        rows = orthogonal(nn.Linear(unmarked.shape[1], codes.shape[1], bias=False))
        gain = nn.Parameter(torch.tensor(3.0))
        optimizer = torch.optim.Adam([*rows.parameters(), gain], lr=1e-2)
        white = torch.from_numpy(self._white(marked)).float()
        target = torch.from_numpy(codes).float()
        weight = None if weights is None else torch.from_numpy(weights).float()[:, None] / float(weights.mean())
        for _ in range(steps):  # full batch: a few thousand reads of 96 numbers
            loss = F.binary_cross_entropy_with_logits(gain * rows(white), target, weight=weight)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        self.rows = rows.weight.detach().double().numpy()
        self.offset = np.median(self._white(unmarked) @ self.rows.T, axis=0)
        self.scale = np.ones(codes.shape[1])

    def _white(self, raw: np.ndarray) -> np.ndarray:
        return (raw - self.centre) @ self.matrix.T

    def calibrate(self, marked: np.ndarray, codes: np.ndarray) -> None:
        self.scale = bit_slopes(torch.from_numpy(self(marked)), torch.from_numpy(codes)).numpy()

    def __call__(self, raw: np.ndarray) -> np.ndarray:
        # the shipped reader's gain; the per-bit calibration refits each logit's slope whatever it is
        return 3.0 * (self._white(raw) @ self.rows.T - self.offset) * self.scale


def model_attacked_outputs(model, args: argparse.Namespace, images: torch.Tensor, case: str) -> list[torch.Tensor]:
    """The evaluated users' copies (the codes and ACT seeds :func:`probe_copies` issues them with),
    their weights attacked by ``case`` (a model attack), decoding ``images``."""
    attack, strength, _ = parse_case(case)

    def attacked_state(state: dict, user: int) -> dict:
        return STATE_ATTACKS[attack](state, strength, torch.Generator().manual_seed(EVAL_SEED + user))

    return issue_copies(model, args.users, args.registry, images, EVAL_SEED, attacked_state)[2]


@torch.no_grad()
def marked_training_outputs(model, n: int, resolution: int) -> tuple[torch.Tensor, np.ndarray]:
    """``n`` training-stream images, each decoded with its own random code (the PNM decoder: a
    stock copy's output within 1e-5), and the codes."""
    images = training_images(resolution, n, seed=TRAIN_SEED)
    codes = torch.randint(0, 2, (n, model.fingerprint_bits), generator=torch.Generator().manual_seed(TRAIN_SEED))
    latents = batched.encode(model.vae, images)
    marked = torch.cat([model.pnm(z, c) for z, c in zip(latents.split(256), codes.split(256), strict=True)])
    return marked, codes.numpy().astype(np.uint8)


@torch.no_grad()
def attacked_reads(model, marked: torch.Tensor) -> np.ndarray:
    """Reads of the ``marked`` training outputs, the ``i``-th of ``len(ROBUSTNESS_SUITE)`` consecutive
    runs under that suite's ``i``-th attack (its own seeds, not the evaluated ones)."""
    runs = marked.tensor_split(len(ROBUSTNESS_SUITE))
    return np.concatenate([reads(model, attacked(part, case, TRAIN_SEED + 1000 + i))
                           for i, (case, part) in enumerate(zip(ROBUSTNESS_SUITE, runs, strict=True))])


def parse_arguments() -> argparse.Namespace:
    parser = copies_parser(__doc__.splitlines()[0])
    parser.add_argument("--train-images", type=int, default=8192,
                        help="marked images the readout is trained on (at least 256: more than its 96 inputs)")
    parser.add_argument("--unmarked", type=int, default=2048, help="unmarked images the reads are whitened on")
    parser.add_argument("--steps", type=int, default=1500, help="full-batch steps of the readout")
    parser.add_argument("--attack-weights", default="",
                        help="comma-separated weights w > 0: for each, an image+ratio readout trained on the marked "
                             "images clean and each under one attack of the robustness suite (other seeds than the "
                             "evaluated ones), the attacked reads' loss weighted w against the clean reads' 1")
    parser.add_argument("--content-readers", nargs="*", type=Path, default=[],
                        help="pnm checkpoints (of the shipped decoder) whose fitted content readers are scored as "
                             "rows too, on the same reads")
    parser.add_argument("--null-images", type=int, default=4096,
                        help="unmarked images read for false accusations (the evaluated images' base decodes first)")
    args = parser.parse_args()
    check_copies_arguments(args)
    check_int("--train-images", args.train_images, 256)
    check_int("--unmarked", args.unmarked, 256)
    check_int("--steps", args.steps)
    check_int("--null-images", args.null_images, args.images)
    try:
        args.attack_weights = [float(w) for w in args.attack_weights.split(",")] if args.attack_weights else []
    except ValueError:
        raise ConfigError(f"--attack-weights takes comma-separated numbers, got {args.attack_weights!r}") from None
    if any(not (w > 0 and math.isfinite(w)) for w in args.attack_weights):
        raise ConfigError(f"--attack-weights must all be finite numbers > 0, got {args.attack_weights}")
    for checkpoint in args.content_readers:
        if not (checkpoint / "fingerprint.json").is_file():
            raise ConfigError(f"--content-readers: {checkpoint} is no fingerprint checkpoint (no fingerprint.json)")
    return args


def main() -> None:
    args = parse_arguments()
    started = time.time()
    model = load_fingerprint_model(shipped_checkpoint("embedded_pnm"))
    resolution = int(model.meta.get("resolution", 32))
    k = model.fingerprint_bits
    base = lambda images: decode_with(model.vae, model.unmarked_vae, images)  # noqa: E731
    images = held_out_images(resolution, args.images, seed=EVAL_SEED)
    codes, index, outputs, truth, calibration, calibration_codes = probe_copies(model, args, images, CALIBRATION_SEED)
    calibration_reads = reads(model, calibration)
    unmarked = reads(model, base(held_out_images(resolution, args.unmarked, seed=WHITEN_SEED)))
    train_outputs, train_codes = marked_training_outputs(model, args.train_images, resolution)
    train_reads = reads(model, train_outputs)
    print(f"reads for fitting ({time.time() - started:.0f} s)", flush=True)
    marked = {case: reads(model, torch.cat([attacked(out, case, EVAL_SEED + u)
                                            for u, out in enumerate(outputs)]))
              for case in CASES}
    marked.update({case: reads(model, torch.cat(model_attacked_outputs(model, args, images, case)))
                   for case in MODEL_CASES})
    control = reads(model, base(held_out_images(resolution, args.null_images, seed=EVAL_SEED)))
    print(f"reads of {len(CASES) + len(MODEL_CASES)} cases ({time.time() - started:.0f} s)", flush=True)
    shipped = shipped_read(model.extractor)
    variants = {"shipped": (lambda raw: shipped(raw[:, :k])),
                "image, learned readout": _readout(unmarked, train_reads, train_codes, calibration_reads,
                                                   calibration_codes, args.steps, slice(0, k)),
                "image+ratio, learned readout": _readout(unmarked, train_reads, train_codes, calibration_reads,
                                                         calibration_codes, args.steps, slice(0, 2 * k)),
                "residual, learned readout": _readout(unmarked, train_reads, train_codes, calibration_reads,
                                                      calibration_codes, args.steps, slice(2 * k, 3 * k))}
    if args.attack_weights:
        train_attacked = attacked_reads(model, train_outputs)
        print(f"attacked training reads ({time.time() - started:.0f} s)", flush=True)
        both = np.concatenate([train_reads, train_attacked])
        for w in args.attack_weights:
            weights = np.concatenate([np.ones(len(train_reads)), np.full(len(train_attacked), w)])
            variants[f"image+ratio, readout trained under attacks (weight {w:g})"] = _readout(
                unmarked, both, np.concatenate([train_codes, train_codes]), calibration_reads, calibration_codes,
                args.steps, slice(0, 2 * k), weights)
    for checkpoint in args.content_readers:
        variants[f"content reader of {checkpoint}"] = _checkpoint_reader(model, checkpoint, images[:8])
    rows = [score_reader(label, read, control, marked, codes, truth, index) for label, read in variants.items()]
    print_tables(f"pnm (shipped), {args.users} copies x {args.images} held-out images, {args.registry} registered, "
                 f"fpr 1e-6, soft decoding; readouts trained on {args.train_images} marked training images "
                 f"({args.steps} steps), whitened on {args.unmarked} unmarked images; unmarked accused: of the base "
                 f"decoder's outputs of {args.null_images} held-out images", "reader", rows, (*CASES, *MODEL_CASES))
    print(f"\n{time.time() - started:.0f} s")


def _checkpoint_reader(model, checkpoint: Path, sample: torch.Tensor):
    """``checkpoint``'s content reader as a function of full reads (its first ``2k`` columns are
    its own reads: checked on ``sample``'s base decodes)."""
    reader = load_fingerprint_model(checkpoint).content_reader
    if reader is None:
        raise ConfigError(f"{checkpoint} has no content reader")
    k = model.fingerprint_bits
    decoded = decode_with(model.vae, model.unmarked_vae, sample)
    with torch.no_grad():
        own = reader.reads(from_uint8(to_uint8(decoded))).double().numpy()
    gap = float(np.abs(own - reads(model, decoded)[:, :2 * k]).max())
    if gap > 1e-3:
        raise RuntimeError(f"{checkpoint}'s content reader reads other numbers than this probe (max gap {gap:.2g})")
    return lambda raw: reader.logits_from_reads(torch.from_numpy(raw[:, :2 * k]).float()).double().numpy()


def _readout(unmarked, train_reads, train_codes, calibration_reads, calibration_codes, steps, columns, weights=None):
    """An :class:`OrthogonalReadout` on the read ``columns`` (each training read's loss weighted by
    ``weights``, if given), calibrated; as a function of full reads."""
    readout = OrthogonalReadout(unmarked[:, columns], train_reads[:, columns], train_codes, steps, 0, weights)
    readout.calibrate(calibration_reads[:, columns], calibration_codes)
    return lambda raw: readout(raw[:, columns])


if __name__ == "__main__":
    exit_on_user_error(main)
