"""Which probe statistic should the code screen keep codes by? (issue 11)

``task=issue`` keeps a code when its copy's 64 probe images read at least a bit floor (their mean
bit accuracy) and decode at least 29.9 dB (``distributor/screening.py``). Attribution fails on a
copy's weakest images, not on its mean, so a statistic of the probe's weak tail may pick better
codes at the same pass rate. This reads ``--codes`` random codes' copies of the shipped checkpoint
once, on the probe images and on ``--images`` held-out images (8-bit pixels), and for each
statistic and each share kept (the PSNR floor always at ``--min-psnr``) scores the kept codes'
held-out attribution as ``screen_policy.py`` does (soft decoding, fpr 1e-6 times the pass rate,
Bonferroni over ``--registry`` users). The statistics, per code over its probe images, with
``s = -log10`` of the true code's soft p-value (``registry/soft.py: soft_tail``, one code):

- ``bit_acc``: the mean bit accuracy (the shipped screen);
- ``mean_s``: the mean of ``s``;
- ``q10_s`` / ``q05_s``: the 10th / 5th percentile of ``s`` (the weak images);
- ``min_s``: the weakest probe image's ``s``.

A second table asks how small the probe may be (a screen's cost is its probe's decodes, and at
Stable Diffusion's size 64 images a draw dominate the cost of a copy): the shipped statistic and
PSNR floor on the first ``n`` probe images only, for each ``n`` of ``--probe-sizes``.

    python experiments/screen_statistic.py --codes 320 --seed 43

Prints a markdown table; the run is appended to ``results/screen_statistic.jsonl``.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from screen_policy import check_setting_arguments, held_out_reads, setting, setting_arguments
from screen_policy import score as policy_score

from fingerprint_lm.distributor.copies import decoder_from_tensors
from fingerprint_lm.distributor.generation import decode_with
from fingerprint_lm.distributor.screening import logits_of
from fingerprint_lm.errors import ConfigError, check_float, check_int, exit_on_user_error
from fingerprint_lm.methods.base import personal_tensors
from fingerprint_lm.metrics.quality import psnr
from fingerprint_lm.registry.soft import quantized_weights, soft_tail
from fingerprint_lm.storage import append_jsonl

RESULTS = Path(__file__).resolve().parent / "results" / "screen_statistic.jsonl"
KEEPS = (0.6, 0.5, 0.4)
STATISTICS = {
    "bit_acc": lambda reads: reads["probe_acc"],
    "mean_s": lambda reads: reads["probe_s"].mean(axis=1),
    "q10_s": lambda reads: np.quantile(reads["probe_s"], 0.10, axis=1),
    "q05_s": lambda reads: np.quantile(reads["probe_s"], 0.05, axis=1),
    "min_s": lambda reads: reads["probe_s"].min(axis=1),
}


def strength(logits: np.ndarray, code: np.ndarray) -> np.ndarray:
    """``-log10`` of the true code's one-code soft p-value on each image (no Bonferroni)."""
    weights = quantized_weights(logits)
    return -np.log10(np.maximum(soft_tail(weights, weights @ code.astype(np.int64)), 1e-300))


@torch.no_grad()
def read_codes(args: argparse.Namespace) -> dict[str, np.ndarray]:
    """Per code: the probe's bit accuracy and PSNR, over all of it and per image, and its per-image
    strength; on the held-out images ``screen_policy.held_out_reads``."""
    run = setting(args)
    out = defaultdict(list)
    for code in run.codes:
        decoder = decoder_from_tensors(run.model.vae.config, *personal_tensors(run.model, code))
        probe = decode_with(run.model.vae, decoder, run.reader.images)
        probe_logits = logits_of(run.model, probe)
        per_image_acc = ((probe_logits > 0) == code.astype(bool)).mean(axis=1)
        per_image_psnr = psnr(probe, run.reader.base).numpy()
        reads = {"probe_acc": float(per_image_acc.mean()), "probe_psnr": float(per_image_psnr.mean()),
                 "probe_s": strength(probe_logits, code), "probe_acc_image": per_image_acc,
                 "probe_psnr_image": per_image_psnr, **held_out_reads(run, decoder, code)}
        for key, value in reads.items():
            out[key].append(value)
    return {key: np.array(value) for key, value in out.items()}


def score(reads: dict[str, np.ndarray], statistic: str, keep: float, min_psnr: float, fpr: float) -> dict:
    """``screen_policy.score`` with ``statistic`` in place of the probe's mean bit accuracy."""
    return {"statistic": statistic, **policy_score({**reads, "probe_acc": STATISTICS[statistic](reads)}, keep,
                                                    min_psnr, fpr)}


def score_probe_size(reads: dict[str, np.ndarray], images: int, keep: float, min_psnr: float,
                     fpr: float) -> dict:
    """The shipped screen (mean bit accuracy, mean PSNR) read on the first ``images`` probe images."""
    small = {**reads, "probe_acc": reads["probe_acc_image"][:, :images].mean(axis=1),
             "probe_psnr": reads["probe_psnr_image"][:, :images].mean(axis=1)}
    return {**score(small, "bit_acc", keep, min_psnr, fpr), "probe_images": images}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    setting_arguments(parser, codes=192, images=256, seed=43)
    parser.add_argument("--min-psnr", type=float, default=29.9)
    parser.add_argument("--probe-sizes", type=int, nargs="*", default=[8, 16, 32, 64])
    args = parser.parse_args()
    check_setting_arguments(args)
    check_float("--min-psnr", args.min_psnr, above=0.0)
    for size in args.probe_sizes:
        if check_int("--probe-sizes", size) > 64:
            raise ConfigError(f"--probe-sizes: the probe has 64 images, got {size}")
    started = time.time()
    reads = read_codes(args)
    rows = [score(reads, statistic, keep, args.min_psnr, args.fpr) for keep in KEEPS for statistic in STATISTICS]
    sizes = [score_probe_size(reads, n, keep, args.min_psnr, args.fpr) for keep in KEEPS for n in args.probe_sizes]
    seconds = round(time.time() - started, 1)
    print(f"{args.codes} random codes of {args.checkpoint}, {args.images} held-out images each (8-bit), registry "
          f"{args.registry}, fpr {args.fpr:g} x pass rate, probe PSNR >= {args.min_psnr} dB\n")
    print("| statistic | keeps | pass rate | attributed (p / rate) | worst code | PSNR mean | copies >= 30 dB |\n"
          "|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['statistic']} | {r['keep']:.0%} | {r['pass_rate']:.3f} | {r['attributed']:.4f} | "
              f"{r['worst_code']:.3f} | {r['mean_psnr']:.2f} | {r['copies_at_30db']:.0%} |")
    print("\n| probe images | keeps | pass rate | attributed (p / rate) | worst code | PSNR mean | copies >= 30 dB |\n"
          "|---|---|---|---|---|---|---|")
    for r in sizes:
        print(f"| {r['probe_images']} | {r['keep']:.0%} | {r['pass_rate']:.3f} | {r['attributed']:.4f} | "
              f"{r['worst_code']:.3f} | {r['mean_psnr']:.2f} | {r['copies_at_30db']:.0%} |")
    print(f"\n{seconds:.0f} s")
    append_jsonl(RESULTS, {"date": time.strftime("%Y-%m-%d"), **vars(args), "seconds": seconds,
                           "rows": rows, "probe_sizes": sizes})


if __name__ == "__main__":
    exit_on_user_error(main)
