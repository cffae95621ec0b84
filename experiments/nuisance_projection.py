"""Probe (issue 11): does projecting the attacks' nuisance directions out of pnm's raw band
energies, before the whitening, read the mark through photometric attacks, with no retraining?

pnm's reader (``models/pooled_extractor.py: BandEnergyExtractor``) takes the log energy of each
image in 48 secret bands and whitens it on unmarked images. A photometric edit moves those log
energies mostly together: brightness and contrast scale every band's energy alike (a common
shift of the log energies, exactly so without clamping), blur and JPEG tilt the spectrum, noise
lifts every band by the same energy. Such shifts do not depend on the user's code, so they are
low-rank across images: this probe estimates them from unmarked images only (the base decoder's
outputs of ``--fit-images`` images, clean and under each of ``--fit-attacks``), keeps the top
``d`` principal directions of the shifts, projects them out of every raw read, refits the
whitening on the projected unmarked reads and calibrates each bit's slope on the copies of
``--calibration-users`` other users (as training calibrates the shipped reader). The copies read
and the decoder are the shipped ones: this is a change of the distributor's private reader only,
so copies already issued would read with it.

For each ``d`` it issues ``--users`` copies (ACT all), decodes ``--images`` held-out images with
each, applies every attack of the robustness suite (8-bit pixels after the attack), and reports bit
accuracy and soft attribution among ``--registry`` users at fpr 1e-6; unmarked images must stay
unaccused. ``d = 0, shipped`` is the shipped reader as it is.

    python experiments/nuisance_projection.py --users 8 --images 256

Prints markdown tables; ``results/nuisance_projection.md`` keeps the run's tables.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from soft_attribution import _count, attacked, issue_copies

from fingerprint_lm.attacks.cases import ROBUSTNESS_SUITE
from fingerprint_lm.distributor.generation import decode_with, held_out_images
from fingerprint_lm.errors import ConfigError, check_int, exit_on_user_error
from fingerprint_lm.models.batched import in_batches
from fingerprint_lm.models.checkpoint import load_fingerprint_model, shipped_checkpoint
from fingerprint_lm.models.pooled_extractor import bit_slopes, whitening_map
from fingerprint_lm.pixels import from_uint8, to_uint8
from fingerprint_lm.registry.soft import soft_identify

# held-out images (evaluated), nuisance fit, whitening; the calibration users' images are the nuisance
# fit's (WHITEN_SEED + 1 == FIT_SEED): neither is ever evaluated
EVAL_SEED, FIT_SEED, WHITEN_SEED = 5, 78, 77
CASES = ("none", *ROBUSTNESS_SUITE, "contrast_1.5")
FIT_ATTACKS = "gaussian_noise_0.05,brightness_1.5,contrast_1.5,gaussian_blur_s1,jpeg_q50,jpeg_q90"


@torch.no_grad()
def raw_reads(extractor, images: torch.Tensor, batch: int = 256) -> np.ndarray:
    """The reader's raw log band energies (before whitening) of ``images`` saved as 8-bit pixels."""
    images = from_uint8(to_uint8(images))
    return in_batches(extractor, lambda m, x: m.raw_logits(x), images, batch_size=batch).double().numpy()


def nuisance_basis(extractor, unmarked: torch.Tensor, attacks: list[str], seed: int) -> np.ndarray:
    """Principal directions (columns, strongest first) of the raw reads' shifts that ``attacks``
    cause on ``unmarked`` images."""
    clean = raw_reads(extractor, unmarked)
    shifts = np.concatenate([raw_reads(extractor, attacked(unmarked, case, seed)) - clean for case in attacks])
    _, _, vt = np.linalg.svd(shifts, full_matrices=False)  # uncentred: a common shift is a direction too
    return vt.T


class ProjectedReader:
    """Raw reads with ``basis`` projected out, whitened on unmarked reads, each bit's slope
    calibrated on marked reads of known codes."""

    def __init__(self, basis: np.ndarray, unmarked_raw: np.ndarray) -> None:
        self.projection = np.eye(unmarked_raw.shape[1]) - basis @ basis.T
        centre, matrix = whitening_map(torch.from_numpy(unmarked_raw @ self.projection), "median")
        self.centre, self.matrix = centre.numpy(), matrix.numpy()
        self.scale = np.ones(unmarked_raw.shape[1])

    def calibrate(self, marked_raw: np.ndarray, codes: np.ndarray) -> None:
        self.scale = bit_slopes(torch.from_numpy(self(marked_raw)), torch.from_numpy(codes)).numpy()

    def __call__(self, raw: np.ndarray) -> np.ndarray:
        return (raw @ self.projection - self.centre) @ self.matrix.T * self.scale


def copies_parser(description: str) -> argparse.ArgumentParser:
    """The arguments of a reader probe on the shipped copies: ``--users`` copies read on ``--images``
    held-out images among ``--registry`` users, each reader calibrated on ``--calibration-users``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--registry", type=int, default=1000)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--calibration-users", type=int, default=4)
    return parser


def check_copies_arguments(args: argparse.Namespace) -> None:
    """The :func:`copies_parser` arguments checked: positive counts, a registry that holds every
    evaluated and calibration user."""
    check_int("--users", args.users)
    check_int("--calibration-users", args.calibration_users)
    check_int("--registry", args.registry, args.users + args.calibration_users)
    check_int("--images", args.images)


def probe_copies(model, args: argparse.Namespace, images: torch.Tensor, calibration_seed: int):
    """``args.users`` copies' outputs of ``images`` (the evaluated ones) and ``args.calibration_users``
    more copies' outputs of other held-out images (``calibration_seed``: the calibration never sees
    the evaluated images), all among ``args.registry`` registered codes. Returns the codes, their
    index, the evaluated outputs (a list per user), each evaluated output's user, the calibration
    outputs (one tensor) and their codes."""
    users = args.users + args.calibration_users
    # the same seed: each user's code and ACT seed are the same in both calls
    codes, index, outputs = issue_copies(model, args.users, args.registry, images, EVAL_SEED)
    truth = np.repeat(np.arange(args.users), len(images))
    other = held_out_images(images.shape[-1], len(images), seed=calibration_seed)
    _, _, calibration = issue_copies(model, users, args.registry, other, EVAL_SEED)
    calibration_codes = np.repeat(codes[args.users:users], len(images), axis=0)
    return codes, index, outputs, truth, torch.cat(calibration[args.users:]), calibration_codes


def score_reader(label: str, read, control: np.ndarray, marked: dict, codes: np.ndarray, truth: np.ndarray,
                 index) -> dict:
    """A table row: unmarked ``control`` reads accused, then per case of ``marked`` (raw reads of the
    copies of ``truth``'s users) bit accuracy, attribution rate and wrong accusations at fpr 1e-6."""
    row = {"d": label, "accused": sum(r["accused"] for r in soft_identify(read(control), index, fpr=1e-6))}
    for case in marked:
        logits = read(marked[case])
        rate, wrong = _count(soft_identify(logits, index, fpr=1e-6), truth, index)
        row[case] = (float(((logits > 0) == codes[truth]).mean()), rate, wrong)
    return row


def parse_arguments() -> argparse.Namespace:
    parser = copies_parser(__doc__.splitlines()[0])
    parser.add_argument("--fit-images", type=int, default=256, help="unmarked images the nuisance is fitted on")
    parser.add_argument("--dims", type=int, nargs="+", default=[0, 1, 2, 4, 8])
    parser.add_argument("--fit-attacks", default=FIT_ATTACKS, help="comma-separated attack cases")
    args = parser.parse_args()
    check_copies_arguments(args)
    check_int("--fit-images", args.fit_images, 64)
    for d in args.dims:
        check_int("--dims", d, 0)
        if d > 24:
            raise ConfigError(f"--dims: at most 24 of the reader's 48 directions, got {d}")
    args.fit_attacks = [case for case in args.fit_attacks.split(",") if case]
    unknown = sorted(set(args.fit_attacks) - set(CASES))
    if not args.fit_attacks or unknown:
        raise ConfigError(f"--fit-attacks: cases of {', '.join(CASES[1:])}; got {unknown or 'none'}")
    return args


def main() -> None:
    args = parse_arguments()
    started = time.time()
    model = load_fingerprint_model(shipped_checkpoint("embedded_pnm"))
    reader, resolution = model.extractor, int(model.meta.get("resolution", 32))
    base = lambda images: decode_with(model.vae, model.unmarked_vae, images)  # noqa: E731
    images = held_out_images(resolution, args.images, seed=EVAL_SEED)
    codes, index, outputs, truth, calibration, calibration_codes = probe_copies(model, args, images, WHITEN_SEED + 1)
    calibration_raw = raw_reads(reader, calibration)
    unmarked_raw = raw_reads(reader, base(held_out_images(resolution, args.fit_images, seed=WHITEN_SEED)))
    basis = nuisance_basis(reader, base(held_out_images(resolution, args.fit_images, seed=FIT_SEED)),
                           args.fit_attacks, FIT_SEED)
    marked = {case: raw_reads(reader, torch.cat([attacked(out, case, EVAL_SEED + u)
                                                 for u, out in enumerate(outputs)]))
              for case in CASES}
    control = raw_reads(reader, base(images))
    rows = []
    variants = [("0, shipped", None)] + [(str(d), d) for d in args.dims]
    for label, d in variants:
        if d is None:
            read = shipped_read(reader)
        else:
            read = ProjectedReader(basis[:, :d], unmarked_raw)
            read.calibrate(calibration_raw, calibration_codes)
        rows.append(score_reader(label, read, control, marked, codes, truth, index))
        print(f"d={label} done ({time.time() - started:.0f} s)", flush=True)
    _print_tables(args, rows)
    print(f"\n{time.time() - started:.0f} s")


def shipped_read(reader):
    """The shipped reader's logits from raw reads (its whitening and per-bit calibration)."""
    centre, matrix = reader.whiten_mean.double().numpy(), reader.whiten_matrix.double().numpy()
    scale = reader.bit_scale.double().numpy()
    return lambda raw: reader.gain * (raw - centre) @ matrix.T * scale


def _print_tables(args: argparse.Namespace, rows: list[dict]) -> None:
    print_tables(f"pnm (shipped), {args.users} copies x {args.images} held-out images, {args.registry} registered, "
                 f"fpr 1e-6, soft decoding; nuisance fitted on {args.fit_images} unmarked images under "
                 f"{', '.join(args.fit_attacks)}", "d", rows)


def print_tables(title: str, label: str, rows: list[dict], cases: tuple[str, ...] = CASES) -> None:
    """Bit accuracy, then attribution rate (wrong accusations), per case of ``cases``: a row per
    reader, named by its ``label`` entry (rows as :func:`score_reader` builds them)."""
    print(f"\n{title}\n")
    for what, position in (("bit accuracy", 0), ("attribution (wrong accusations)", 1)):
        print(f"{what}\n\n| {label} | unmarked accused | " + " | ".join(cases) + " |")
        print("|---" * (len(cases) + 2) + "|")
        for row in rows:
            cells = [f"{row[c][0]:.3f}" if position == 0 else f"{row[c][1]:.3f} ({row[c][2]})" for c in cases]
            print(f"| {row['d']} | {row['accused']} | " + " | ".join(cells) + " |")
        print()


if __name__ == "__main__":
    exit_on_user_error(main)
