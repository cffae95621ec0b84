"""Probe (issue 11): does the content reader read more of the shipped copies' marks from each band's
full colour covariance than from its one energy, with no retraining?

The content reader (``models/content_reader.py``) reads, per secret band, one number: the log
energy of the band filter's response, summed over the RGB channels by the filter's own colour
weights, and the same minus that of the image as the base VAE re-makes it. pnm's mapping network
sets gains on the decoder's features, and those features reach the three colour channels in
proportions of their own, so a code can change *how* the colours co-vary in a band without
changing the one energy the filter sums. This probe splits each band filter into its three
per-channel parts and reads, per band, the 3 x 3 covariance of the channels' responses (summed over
the filter's quadrature pair, averaged over positions): three log variances and three
correlations, and the same of the re-made image subtracted (the ratio reads). The reader's own
band energy is the sum of that matrix's nine entries, so each richer read holds the shipped one.

Readers, each a ZCA whitening on unmarked reads and an orthonormal readout trained by BCE on
marked training images of random codes (``ratio_reader.OrthogonalReadout``, as the shipped content
reader's fit), the readout also trained on the same images under the robustness suite's attacks
at weight ``--attack-weight`` (as pnm.yaml's ``content_reader.attack_weight``):

- ``energy``: per band the log energy and its ratio (96 reads: the shipped content reader's);
- ``+ variances``: and per band and channel the log variance and its ratio (+288);
- ``+ covariance``: and per band the three channel correlations and their differences (+288);
- ``+ covariance + phase``: and per band the channels' relative phases (the antisymmetric part of
  their cosine-sine cross-covariance) and their differences (+288);
- ``+ covariance, both scales``: the covariance reads of the image and of the image halved by a
  2 x 2 average (the same filters then read an octave lower) (672 + 672).

Copies (ACT all), images, attacks and scoring are those of ``ratio_reader.py``.

    python experiments/colour_covariance_reader.py --users 8 --images 256

Prints markdown tables; ``results/colour_covariance_reader.md`` keeps the run's tables.
"""

from __future__ import annotations

import time

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
)
from ratio_reader import (
    CALIBRATION_SEED,
    EVAL_SEED,
    MODEL_CASES,
    TRAIN_SEED,
    WHITEN_SEED,
    OrthogonalReadout,
    marked_training_outputs,
    model_attacked_outputs,
)
from soft_attribution import attacked

from fingerprint_lm.attacks.cases import ROBUSTNESS_SUITE
from fingerprint_lm.distributor.generation import decode_with, held_out_images
from fingerprint_lm.errors import ConfigError, check_int, exit_on_user_error
from fingerprint_lm.models.checkpoint import load_fingerprint_model, shipped_checkpoint
from fingerprint_lm.pixels import from_uint8, to_uint8


def band_colour_stats(images: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``[B, k, 10]`` per band of the filter pairs ``weight`` ``[2k, 3, s, s]``: the log energy of the
    whole filter's response (the reader's own read), the three channels' log variances, the
    correlations of channels (0,1), (0,2), (1,2), each over the pair and the valid positions; and
    for the same channel pairs the antisymmetric part of the cosine-sine cross-covariance (the
    channels' relative phase in the band), normalised the same way."""
    k2, channels, s, _ = weight.shape
    per_channel = weight.transpose(0, 1).reshape(channels * k2, 1, s, s)
    response = F.conv2d(images, per_channel, groups=channels)  # [B, 3 * 2k, h, w], channel-major
    b, _, h, w = response.shape
    r = response.view(b, channels, k2 // 2, 2, h * w)
    cov = torch.einsum("bckqn,bdkqn->bkcd", r, r) / (h * w)  # [B, k, 3, 3]: summed over the pair
    cross = torch.einsum("bckn,bdkn->bkcd", r[:, :, :, 0], r[:, :, :, 1]) / (h * w)  # cosine x sine
    var = cov.diagonal(dim1=2, dim2=3).clamp_min(1e-8)  # [B, k, 3]
    pairs = [(0, 1), (0, 2), (1, 2)]
    norm = [(var[..., i] * var[..., j]).sqrt() for i, j in pairs]
    corr = torch.stack([cov[..., i, j] / n for (i, j), n in zip(pairs, norm, strict=True)], -1)
    phase = torch.stack([(cross[..., i, j] - cross[..., j, i]) / n for (i, j), n in zip(pairs, norm, strict=True)], -1)
    energy = cov.sum(dim=(2, 3)).clamp_min(0) + 1e-8  # the whole filter's energy: all nine entries
    return torch.cat([energy.log()[..., None], var.log(), corr, phase], -1)


STATS = 20  # per band: 10 statistics at full scale, the same of the image halved (2 x 2 average)


def _stats(images: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    half = F.avg_pool2d(images, 2)
    return torch.cat([band_colour_stats(images, weight), band_colour_stats(half, weight)], -1)


@torch.no_grad()
def reads(model, images: torch.Tensor, batch: int = 256) -> np.ndarray:
    """``[n, 2 * STATS * k]``: :func:`_stats` of ``images`` (saved as 8-bit pixels) and of those
    minus the re-made images' (each ``[n, STATS * k]``, columns grouped by statistic then band)."""
    weight = model.content_reader.band_weight
    out = []
    for part in from_uint8(to_uint8(images)).split(batch):
        remade = decode_with(model.unmarked_vae, model.unmarked_vae, part)
        h, w = remade.shape[-2:]
        own = _stats(part[..., :h, :w], weight)
        other = _stats(remade, weight)
        out.append(torch.cat([own.transpose(1, 2).flatten(1), (own - other).transpose(1, 2).flatten(1)], 1))
    return torch.cat(out).double().numpy()


def columns(k: int, stats: list[int]) -> np.ndarray:
    """The read columns of statistics ``stats`` (0: energy, 1-3: variances, 4-6: correlations, 7-9:
    relative phases; 10-19 the same of the halved image), for the image and for its ratio."""
    image = np.concatenate([np.arange(s * k, (s + 1) * k) for s in stats])
    return np.concatenate([image, image + STATS * k])


READERS = {"energy": [0], "+ variances": [0, 1, 2, 3], "+ covariance": list(range(7)),
           "+ covariance + phase": list(range(10)), "+ covariance, both scales": [*range(7), *range(10, 17)]}


def parse_arguments():
    parser = copies_parser(__doc__.splitlines()[0])
    parser.add_argument("--train-images", type=int, default=8192, help="marked images the readouts train on")
    parser.add_argument("--unmarked", type=int, default=4096, help="unmarked images the reads are whitened on")
    parser.add_argument("--steps", type=int, default=1500, help="full-batch steps of each readout")
    parser.add_argument("--attack-weight", type=float, default=0.25,
                        help="loss weight of the training images' attacked reads (0: clean reads only)")
    parser.add_argument("--readers", default=",".join(READERS),
                        help=f"comma-separated readers to fit and score, of: {', '.join(READERS)}")
    args = parser.parse_args()
    check_copies_arguments(args)
    check_int("--train-images", args.train_images, 1024)
    check_int("--unmarked", args.unmarked, 1024)
    check_int("--steps", args.steps)
    if not 0 <= args.attack_weight < float("inf"):
        raise ConfigError(f"--attack-weight must be a finite number >= 0, got {args.attack_weight}")
    args.readers = [name.strip() for name in args.readers.split(",") if name.strip()]
    unknown = sorted(set(args.readers) - set(READERS))
    if not args.readers or unknown:
        raise ConfigError(f"--readers: names of {', '.join(READERS)}; got {unknown or 'none'}")
    return args


def main() -> None:
    args = parse_arguments()
    started = time.time()
    model = load_fingerprint_model(shipped_checkpoint("embedded_pnm"))
    resolution, k = int(model.meta.get("resolution", 32)), model.fingerprint_bits
    base = lambda images: decode_with(model.vae, model.unmarked_vae, images)  # noqa: E731
    images = held_out_images(resolution, args.images, seed=EVAL_SEED)
    codes, index, outputs, truth, calibration, calibration_codes = probe_copies(model, args, images, CALIBRATION_SEED)
    calibration_reads = reads(model, calibration)
    unmarked = reads(model, base(held_out_images(resolution, args.unmarked, seed=WHITEN_SEED)))
    train_outputs, train_codes = marked_training_outputs(model, args.train_images, resolution)
    train_reads, train_weights = reads(model, train_outputs), np.ones(args.train_images)
    if args.attack_weight > 0:
        runs = train_outputs.tensor_split(len(ROBUSTNESS_SUITE))
        under_attack = np.concatenate([reads(model, attacked(part, case, TRAIN_SEED + 1000 + i))
                                       for i, (case, part) in enumerate(zip(ROBUSTNESS_SUITE, runs, strict=True))])
        train_reads = np.concatenate([train_reads, under_attack])
        train_codes = np.concatenate([train_codes, train_codes])
        train_weights = np.concatenate([train_weights, np.full(args.train_images, args.attack_weight)])
    print(f"reads for fitting ({time.time() - started:.0f} s)", flush=True)
    marked = {case: reads(model, torch.cat([attacked(out, case, EVAL_SEED + u) for u, out in enumerate(outputs)]))
              for case in dict.fromkeys(CASES)}  # contrast_1.5 is in the suite now and was in CASES
    marked.update({case: reads(model, torch.cat(model_attacked_outputs(model, args, images, case)))
                   for case in MODEL_CASES})
    control = reads(model, base(images))
    print(f"reads of {len(CASES) + len(MODEL_CASES)} cases ({time.time() - started:.0f} s)", flush=True)
    rows = []
    for label in args.readers:
        stats = READERS[label]
        cols = columns(k, stats)
        readout = OrthogonalReadout(unmarked[:, cols], train_reads[:, cols], train_codes, args.steps, 0, train_weights)
        readout.calibrate(calibration_reads[:, cols], calibration_codes)
        rows.append(score_reader(f"{label} ({len(cols)} reads)", lambda raw, r=readout, c=cols: r(raw[:, c]),
                                 control, marked, codes, truth, index))
        print(f"{label} done ({time.time() - started:.0f} s)", flush=True)
    print_tables(f"pnm (shipped), {args.users} copies x {args.images} held-out images, {args.registry} registered, "
                 f"fpr 1e-6, soft decoding; readouts trained on {args.train_images} marked training images "
                 f"(and the same under attack at weight {args.attack_weight:g}; {args.steps} steps), whitened on "
                 f"{args.unmarked} unmarked images; unmarked accused: of the base decoder's outputs of the "
                 f"{args.images} evaluated images", "reader", rows, (*dict.fromkeys(CASES), *MODEL_CASES))
    print(f"\n{time.time() - started:.0f} s")


if __name__ == "__main__":
    exit_on_user_error(main)
