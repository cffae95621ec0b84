"""Issue 11: are the attacked reads of the shipped pnm checkpoint lost to a shifted threshold, or to noise?

The content reader's logits are whitened on unmarked 32 px images and thresholded at 0. A crop
(smaller image), a shift or JPEG could move every logit's centre; then an attack-matched threshold
(the unmarked mean of the same attack, or the midpoint of the two classes' means on marked
calibration images) would recover bits for free. This reads ``--images`` held-out images decoded
under random codes (and the base decoder's outputs: unmarked), clean and per attack, and scores
each threshold; it also prints each attack's separation of the two classes' mean logits against the
logits' spread, which is what a threshold cannot change. Calibration: ``--calibration`` images of
another stream. Prints a table, appends to ``results/read_threshold_probe.jsonl``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from fingerprint_lm.attacks.cases import image_case
from fingerprint_lm.distributor.generation import held_out_images, training_images
from fingerprint_lm.errors import ConfigError, check_int, exit_on_user_error
from fingerprint_lm.models import batched
from fingerprint_lm.models.batched import evaluating
from fingerprint_lm.models.checkpoint import load_fingerprint_model, shipped_checkpoint
from fingerprint_lm.models.vae import encode_latents
from fingerprint_lm.pixels import from_uint8, to_uint8
from fingerprint_lm.report.text_tables import markdown_lines
from fingerprint_lm.storage import append_jsonl

RESULTS = Path(__file__).resolve().parent / "results" / "read_threshold_probe.jsonl"
CASES = ("clean", "shift_1", "shift_4", "shift_8", "crop_0.5", "jpeg_q90", "gaussian_blur_s1")


@torch.no_grad()
def decoded(model, images: torch.Tensor, codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``images`` through the copy of each row's code, and through the base decoder (unmarked),
    both as 8-bit images (what a found image is)."""
    marked, unmarked = [], []
    with evaluating(model.vae, model.pnm, model.unmarked_vae):
        for chunk, code in zip(images.split(128), codes.split(128)):
            latents = encode_latents(model.vae, chunk)
            marked.append(from_uint8(to_uint8(model.pnm(latents, code).float())))
            unmarked.append(from_uint8(to_uint8(model.unmarked_vae.decode(latents).sample.float())))
    return torch.cat(marked), torch.cat(unmarked)


@torch.no_grad()
def read(model, images: torch.Tensor, case: str, seed: int) -> torch.Tensor:
    if case != "clean":
        images = from_uint8(to_uint8(image_case(case)(images, torch.Generator().manual_seed(seed))))
    with evaluating(model.content_reader):
        return batched.extract(model.content_reader, images, batch_size=128)


def accuracy(logits: torch.Tensor, codes: torch.Tensor, threshold: torch.Tensor | float = 0.0) -> float:
    return float(((logits > threshold).long() == codes).float().mean())


def score_case(model, case: str, test: tuple, calibration: tuple, seed: int) -> dict:
    (marked, unmarked, codes), (cal_marked, cal_unmarked, cal_codes) = test, calibration
    logits, cal = read(model, marked, case, seed), read(model, cal_marked, case, seed)
    ones = torch.where(cal_codes.bool(), cal, torch.nan).nanmean(0)
    zeros = torch.where(~cal_codes.bool(), cal, torch.nan).nanmean(0)
    null = read(model, cal_unmarked, case, seed)
    return {"case": case, "bit_acc_threshold_0": accuracy(logits, codes),
            "bit_acc_unmarked_mean": accuracy(logits, codes, null.mean(0)),
            "bit_acc_class_midpoint": accuracy(logits, codes, (ones + zeros) / 2),
            "unmarked_mean_abs": float(read(model, unmarked, case, seed).mean(0).abs().mean()),
            "class_separation": float((ones - zeros).mean()), "logit_sd_unmarked": float(null.std(0).mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=512, help="held-out images (each its own random code)")
    parser.add_argument("--calibration", type=int, default=1024, help="calibration images of another stream")
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args()
    for name in ("--images", "--calibration"):
        check_int(name, getattr(args, name.lstrip("-")))
    model = load_fingerprint_model(shipped_checkpoint("embedded_pnm"))
    if model.content_reader is None:
        raise ConfigError("the shipped pnm checkpoint has no content reader to probe")
    started, k = time.perf_counter(), model.fingerprint_bits
    generator = torch.Generator().manual_seed(args.seed)
    cal_codes = torch.randint(0, 2, (args.calibration, k), generator=generator)
    codes = torch.randint(0, 2, (args.images, k), generator=generator)
    calibration = (*decoded(model, training_images(32, args.calibration, 5), cal_codes), cal_codes)
    test = (*decoded(model, held_out_images(32, args.images), codes), codes)
    rows = [score_case(model, case, test, calibration, args.seed + 8) for case in CASES]
    stamp = {"images": args.images, "calibration": args.calibration, "seed": args.seed,
             "seconds": round(time.perf_counter() - started), "date": time.strftime("%Y-%m-%d %H:%M")}
    append_jsonl(RESULTS, *({**row, **stamp} for row in rows))
    columns = tuple(rows[0])
    print("\n".join(markdown_lines(columns, rows, lambda v: f"{v:.4f}" if isinstance(v, float) else str(v))))
    print(f"{stamp['seconds']} s; appended to {RESULTS}")


if __name__ == "__main__":
    exit_on_user_error(main)
