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
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fingerprint_lm.distributor.copies import decoder_from_tensors
from fingerprint_lm.distributor.generation import decode_with, held_out_images
from fingerprint_lm.distributor.screening import ProbeReader, logits_of
from fingerprint_lm.errors import check_float, check_int, check_probability, exit_on_user_error
from fingerprint_lm.methods.base import personal_tensors
from fingerprint_lm.metrics.quality import psnr
from fingerprint_lm.models.checkpoint import FingerprintModel, load_fingerprint_model, shipped_checkpoint
from fingerprint_lm.registry.soft import quantized_weights, soft_tail
from fingerprint_lm.storage import append_jsonl

RESULTS = Path(__file__).resolve().parent / "results" / "screen_policy.jsonl"
EVAL_SEED = 5  # the held-out images the other pnm probes read (the probe's seed is the screen's own)
KEEPS = (1.0, 0.9, 0.75, 0.6, 0.5, 0.4, 0.3)


@dataclass
class Setting:
    """What every read of a run shares: the model, its probe reader, the held-out images and the
    base decoder's outputs of them, the candidate codes and the innocents' codes."""

    model: FingerprintModel
    reader: ProbeReader
    images: torch.Tensor
    base: torch.Tensor
    codes: np.ndarray
    innocents: np.ndarray


@torch.no_grad()
def setting(args: argparse.Namespace) -> Setting:
    """``--codes`` candidate codes and ``--registry - 1`` innocents (``--seed``), ``--images``
    held-out images (``EVAL_SEED``) and their base outputs, for ``--checkpoint``."""
    model = load_fingerprint_model(shipped_checkpoint(args.checkpoint))
    images = held_out_images(int(model.meta.get("resolution", 32)), args.images, EVAL_SEED)
    rng = np.random.default_rng(args.seed)
    codes = rng.integers(0, 2, (args.codes, model.fingerprint_bits), dtype=np.uint8)
    innocents = rng.integers(0, 2, (args.registry - 1, model.fingerprint_bits), dtype=np.uint8)
    return Setting(model, ProbeReader(model), images, decode_with(model.vae, model.unmarked_vae, images), codes,
                   innocents)


@torch.no_grad()
def held_out_reads(run: Setting, decoder, code: np.ndarray) -> dict[str, Any]:
    """``decoder``'s held-out images read for ``code``: per image the true code's Bonferroni soft
    p-value (``p_true``) and whether it outscores every innocent (``top``); the bit accuracy and
    the mean PSNR against the base decoder."""
    decoded = decode_with(run.model.vae, decoder, run.images)
    logits = logits_of(run.model, decoded)
    weights = quantized_weights(logits)
    own = weights @ code.astype(np.int64)
    return {"p_true": soft_tail(weights, own) * (len(run.innocents) + 1),
            "top": own > (weights @ run.innocents.T.astype(np.int64)).max(axis=1),
            "bit_acc": float(((logits > 0) == code.astype(bool)).mean()),
            "psnr": float(psnr(decoded, run.base).mean())}


def setting_arguments(parser: argparse.ArgumentParser, codes: int, images: int, seed: int) -> None:
    """The arguments :func:`setting` reads (``--checkpoint --codes --images --registry --fpr --seed``),
    with these defaults; :func:`check_setting_arguments` checks them."""
    parser.add_argument("--checkpoint", default="embedded_pnm")
    parser.add_argument("--codes", type=int, default=codes)
    parser.add_argument("--images", type=int, default=images)
    parser.add_argument("--registry", type=int, default=1000)
    parser.add_argument("--fpr", type=float, default=1e-6)
    parser.add_argument("--seed", type=int, default=seed)


def check_setting_arguments(args: argparse.Namespace) -> None:
    check_int("--codes", args.codes, 4)
    check_int("--images", args.images)
    check_int("--registry", args.registry, 2)
    check_probability("--fpr", args.fpr)


def read_codes(run: Setting) -> dict[str, np.ndarray]:
    """Per code of ``run``: its probe read and PSNR, and :func:`held_out_reads`."""
    out = defaultdict(list)
    for code in run.codes:
        probe_acc, probe_psnr = run.reader(code)
        decoder = decoder_from_tensors(run.model.vae.config, *personal_tensors(run.model, code))
        reads = {"probe_acc": probe_acc, "probe_psnr": probe_psnr, **held_out_reads(run, decoder, code)}
        for key, value in reads.items():
            out[key].append(value)
    return {key: np.array(value) for key, value in out.items()}


def cached_read_codes(run: Setting, args: argparse.Namespace, path: Path | None) -> dict[str, np.ndarray]:
    """:func:`read_codes`, from the ``.npz`` file ``path`` when it holds them for ``args``'s
    setting, else read (and written there; None: not cached)."""
    key = json.dumps({k: getattr(args, k) for k in ("checkpoint", "codes", "images", "registry", "seed")})
    reads = load_cached(path, key) if path else None
    if reads is None:
        reads = read_codes(run)
        if path:
            save_cached(path, key, reads)
    return reads


def load_cached(path: Path, key: str) -> dict[str, np.ndarray] | None:
    """The arrays :func:`save_cached` wrote to ``path`` under ``key``; None when absent or another key's."""
    if not path.is_file():
        return None
    stored = np.load(path)
    return {k: stored[k] for k in stored.files if k != "key"} if str(stored["key"]) == key else None


def save_cached(path: Path, key: str, arrays: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:  # np.savez(path) would add ".npz" to a path without it
        np.savez(handle, key=key, **arrays)


def score(reads: dict[str, np.ndarray], keep: float, min_psnr: float | None, fpr: float) -> dict:
    floor = float(np.quantile(reads["probe_acc"], 1.0 - keep)) if keep < 1 else 0.0
    kept = (reads["probe_acc"] >= floor) & (reads["probe_psnr"] >= (min_psnr or 0.0))
    return {"keep": keep, "bit_floor": floor, "min_psnr": min_psnr, **score_kept(reads, kept, fpr)}


def score_kept(reads: dict[str, np.ndarray], kept: np.ndarray, fpr: float) -> dict:
    """How the ``kept`` codes' copies read held out, attribution at ``fpr`` times their share."""
    rate = float(kept.mean())
    hits = reads["top"][kept] & (reads["p_true"][kept] <= fpr * rate)
    quality = reads["psnr"][kept]
    return {"codes_kept": int(kept.sum()), "pass_rate": rate,
            "attributed": float(hits.mean()), "attributed_uncorrected": float(
                (reads["top"][kept] & (reads["p_true"][kept] <= fpr)).mean()),
            "worst_code": float(hits.mean(axis=1).min()), "bit_acc": float(reads["bit_acc"][kept].mean()),
            "mean_psnr": float(quality.mean()), "min_psnr_copy": float(quality.min()),
            "copies_at_30db": float((quality >= 30.0).mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    setting_arguments(parser, codes=192, images=256, seed=41)
    parser.add_argument("--min-psnr", type=float, nargs="*", default=[29.7, 29.8, 29.9, 30.0])
    args = parser.parse_args()
    check_setting_arguments(args)
    for value in args.min_psnr:
        check_float("--min-psnr", value, above=0.0)
    started = time.time()
    reads = read_codes(setting(args))
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
    append_jsonl(RESULTS, {"date": time.strftime("%Y-%m-%d"), **vars(args), "seconds": seconds, "rows": rows})


if __name__ == "__main__":
    exit_on_user_error(main)
