"""Can a per-copy modulation gain replace the PSNR floor of code screening? (issue 11) No.

Screening keeps a code only when its copy reads and looks well on a probe; attribution's bound then
divides every p-value by the screen's pass rate (``distributor/attribution.py``), about 0.43 with
the floors shipped until 2026-12-06 afternoon, and many rejections were the PSNR floor's. If a copy's
PSNR fell smoothly as its modulation grew, scaling each copy's modulation (``personal_tensors(...,
modulation_gain=g)`` multiplies every modulation value by ``g``) would hold every copy to the
quality floor without rejecting a code. This reads ``--codes`` random codes' copies of the shipped
checkpoint on the 64 screening probe images at each of ``--gains``: probe bit accuracy and PSNR
against the base decoder, mean and range over the codes.

    python experiments/copy_gain.py --codes 16

Prints a markdown table; the row is appended to ``results/copy_gain.jsonl``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from fingerprint_lm.distributor.copies import decoder_from_tensors
from fingerprint_lm.distributor.generation import decode_with
from fingerprint_lm.distributor.screening import ProbeReader, logits_of
from fingerprint_lm.errors import DataError, check_float, check_int, exit_on_user_error
from fingerprint_lm.methods.base import personal_tensors
from fingerprint_lm.metrics.quality import psnr
from fingerprint_lm.models.checkpoint import load_fingerprint_model, shipped_checkpoint
from fingerprint_lm.storage import append_jsonl

RESULTS = Path(__file__).resolve().parent / "results" / "copy_gain.jsonl"


@torch.no_grad()
def probe_at(reader: ProbeReader, code: np.ndarray, gain: float) -> tuple[float, float]:
    """(probe bit accuracy, probe PSNR) of ``code``'s copy with its modulation times ``gain``."""
    model = reader.model
    decoder = decoder_from_tensors(model.vae.config, *personal_tensors(model, code, modulation_gain=gain))
    decoded = decode_with(model.vae, decoder, reader.images)
    accuracy = float(((logits_of(model, decoded) > 0) == np.asarray(code, dtype=bool)).mean())
    return accuracy, float(psnr(decoded, reader.base).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="embedded_pnm")
    parser.add_argument("--codes", type=int, default=16)
    parser.add_argument("--gains", type=float, nargs="+", default=[0.0, 0.5, 0.8, 0.9, 0.95, 1.0, 1.05, 1.1, 1.25])
    parser.add_argument("--seed", type=int, default=31)
    args = parser.parse_args()
    check_int("--codes", args.codes)
    if not args.gains:
        raise DataError("--gains needs at least one value")
    for gain in args.gains:
        check_float("--gains", gain, minimum=0.0)
    started = time.time()
    model = load_fingerprint_model(shipped_checkpoint(args.checkpoint))
    reader = ProbeReader(model)
    codes = np.random.default_rng(args.seed).integers(0, 2, (args.codes, model.fingerprint_bits), dtype=np.uint8)
    reads = np.array([[probe_at(reader, code, gain) for gain in args.gains] for code in codes])  # [codes, gains, 2]
    seconds = round(time.time() - started, 1)
    print(f"{args.codes} random codes of {args.checkpoint}, the 64 screening probe images; gain 0 is the shared "
          "decoder without any modulation\n")
    print("| gain | probe bit_acc mean (min-max) | probe PSNR dB mean (min-max) |\n|---|---|---|")
    for j, gain in enumerate(args.gains):
        acc, quality = reads[:, j, 0], reads[:, j, 1]
        print(f"| {gain:g} | {acc.mean():.3f} ({acc.min():.3f}-{acc.max():.3f}) | "
              f"{quality.mean():.2f} ({quality.min():.2f}-{quality.max():.2f}) |")
    best = np.array(args.gains)[reads[:, :, 1].argmax(axis=1)]
    print(f"\nthe gain of highest PSNR per code: {', '.join(f'{g:g}' for g in best)}; {seconds:.0f} s")
    append_jsonl(RESULTS, {"date": time.strftime("%Y-%m-%d"), **vars(args), "seconds": seconds,
                           "bit_acc": reads[:, :, 0].tolist(), "psnr": reads[:, :, 1].tolist()})


if __name__ == "__main__":
    exit_on_user_error(main)
