"""Which screening floors attribute best once the bound pays for the screen? (issue 11)

``task=issue`` keeps a code only when its copy's probe reads at least a bit floor and decodes at
least a PSNR floor from the base decoder (``distributor/screening.py``). Attribution's bound divides
every p-value by the screen's pass rate ``r`` (``distributor/attribution.py``), since a screened
code is uniform only given that it passes: a stricter screen issues better codes but tests each at
a smaller ``fpr x r``. This reads ``--codes`` random codes' copies of the shipped checkpoint once,
on the 64 screening probe images and on ``--images`` held-out images (8-bit pixels), and then
scores every pair of floors without decoding again:

- bit floor: the probe read that keeps the best ``keep`` of the codes (``1``: none);
- PSNR floor: none or each of ``--min-psnr``;
- per pair: the pass rate (share of the codes kept), the share of the kept codes' held-out images
  attributed to their user among ``--registry`` users (the other ``registry - 1`` uniform codes;
  soft decoding, fpr 1e-6 times ``r``, Bonferroni over the registry, the user's score above every
  innocent's), their bit accuracy, and held-out PSNR (mean, worst copy, share of copies >= 30 dB).

    python experiments/screen_policy.py --codes 192

Prints a markdown table; the row is appended to ``results/screen_policy.jsonl``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import numpy as np
import torch

from fingerprint_lm.distributor.copies import decoder_from_tensors
from fingerprint_lm.distributor.generation import decode_with, held_out_images
from fingerprint_lm.distributor.screening import ProbeReader, logits_of
from fingerprint_lm.errors import check_float, check_int, exit_on_user_error
from fingerprint_lm.methods.base import personal_tensors
from fingerprint_lm.metrics.quality import psnr
from fingerprint_lm.models.checkpoint import load_fingerprint_model, shipped_checkpoint
from fingerprint_lm.registry.soft import quantized_weights, soft_tail

RESULTS = Path(__file__).resolve().parent / "results" / "screen_policy.jsonl"
EVAL_SEED = 5  # the held-out images the other pnm probes read (the probe's seed is the screen's own)
KEEPS = (1.0, 0.9, 0.75, 0.6, 0.5, 0.4, 0.3)


@torch.no_grad()
def read_codes(args: argparse.Namespace) -> dict[str, np.ndarray]:
    """Per code: its probe read and PSNR, and on the held-out images the true code's Bonferroni
    p-value and whether it outscores every innocent, per image; the held-out bit accuracy and PSNR."""
    model = load_fingerprint_model(shipped_checkpoint(args.checkpoint))
    reader = ProbeReader(model)
    images = held_out_images(int(model.meta.get("resolution", 32)), args.images, EVAL_SEED)
    base = decode_with(model.vae, model.unmarked_vae, images)
    rng = np.random.default_rng(args.seed)
    codes = rng.integers(0, 2, (args.codes, model.fingerprint_bits), dtype=np.uint8)
    innocents = rng.integers(0, 2, (args.registry - 1, model.fingerprint_bits), dtype=np.uint8)
    out = {key: [] for key in ("probe_acc", "probe_psnr", "p_true", "top", "bit_acc", "psnr")}
    for code in codes:
        probe_acc, probe_psnr = reader(code)
        decoded = decode_with(model.vae, decoder_from_tensors(model.vae.config, *personal_tensors(model, code)), images)
        logits = logits_of(model, decoded)
        weights = quantized_weights(logits)
        own = weights @ code.astype(np.int64)
        out["probe_acc"].append(probe_acc)
        out["probe_psnr"].append(probe_psnr)
        out["p_true"].append(soft_tail(weights, own) * args.registry)
        out["top"].append(own > (weights @ innocents.T.astype(np.int64)).max(axis=1))
        out["bit_acc"].append(float(((logits > 0) == code.astype(bool)).mean()))
        out["psnr"].append(float(psnr(decoded, base).mean()))
    return {key: np.array(value) for key, value in out.items()}


def score(reads: dict[str, np.ndarray], keep: float, min_psnr: float | None, fpr: float) -> dict:
    floor = float(np.quantile(reads["probe_acc"], 1.0 - keep)) if keep < 1 else 0.0
    kept = (reads["probe_acc"] >= floor) & (reads["probe_psnr"] >= (min_psnr or 0.0))
    rate = float(kept.mean())
    hits = reads["top"][kept] & (reads["p_true"][kept] <= fpr * rate)
    quality = reads["psnr"][kept]
    return {"keep": keep, "bit_floor": floor, "min_psnr": min_psnr, "codes_kept": int(kept.sum()), "pass_rate": rate,
            "attributed": float(hits.mean()), "attributed_uncorrected": float(
                (reads["top"][kept] & (reads["p_true"][kept] <= fpr)).mean()),
            "worst_code": float(hits.mean(axis=1).min()), "bit_acc": float(reads["bit_acc"][kept].mean()),
            "mean_psnr": float(quality.mean()), "min_psnr_copy": float(quality.min()),
            "copies_at_30db": float((quality >= 30.0).mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="embedded_pnm")
    parser.add_argument("--codes", type=int, default=192)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--registry", type=int, default=1000)
    parser.add_argument("--min-psnr", type=float, nargs="*", default=[29.7, 29.8, 29.9, 30.0])
    parser.add_argument("--fpr", type=float, default=1e-6)
    parser.add_argument("--seed", type=int, default=41)
    args = parser.parse_args()
    check_int("--codes", args.codes, 4)
    check_int("--images", args.images)
    check_int("--registry", args.registry, 2)
    check_float("--fpr", args.fpr, above=0.0, maximum=1.0)
    for value in args.min_psnr:
        check_float("--min-psnr", value, above=0.0)
    started = time.time()
    reads = read_codes(args)
    rows = [score(reads, keep, min_psnr, args.fpr)
            for keep, min_psnr in itertools.product(KEEPS, [None, *args.min_psnr])]
    seconds = round(time.time() - started, 1)
    print(f"{args.codes} random codes of {args.checkpoint}, {args.images} held-out images each (8-bit), registry "
          f"{args.registry}, fpr {args.fpr:g} x pass rate\n")
    print("| bit floor keeps | PSNR floor | pass rate | attributed (p / rate) | without the correction | worst code | "
          "bit_acc | PSNR mean | worst copy | copies >= 30 dB |\n|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['keep']:.0%} ({r['bit_floor']:.4f}) | {r['min_psnr'] or '-'} | {r['pass_rate']:.3f} | "
              f"{r['attributed']:.4f} | {r['attributed_uncorrected']:.4f} | {r['worst_code']:.3f} | "
              f"{r['bit_acc']:.3f} | {r['mean_psnr']:.2f} | {r['min_psnr_copy']:.2f} | {r['copies_at_30db']:.0%} |")
    print(f"\n{seconds:.0f} s")
    RESULTS.parent.mkdir(exist_ok=True)
    with RESULTS.open("a") as handle:
        handle.write(json.dumps({"date": time.strftime("%Y-%m-%d"), **vars(args), "seconds": seconds,
                                 "rows": rows}) + "\n")


if __name__ == "__main__":
    exit_on_user_error(main)
