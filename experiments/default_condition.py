"""Does a method meet the default's condition, measured the way a distributor meets it? (issue 11)

The condition for ``method=pnm`` to become the default: its stock-loaded copies get >= 99% of
clean images attributed to their user at >= 30 dB. The other probes read decoders built in memory
from a copy's tensors; this one goes the whole way a distributor and a user go:

- a registry file with ``--registry`` users (innocents first, registered without copies);
- ``--users`` copies issued with ``distributor.copies.issue_copy`` (ACT all, a secret), written
  to disk, with codes screened on the probe (``distributor/screening.py``): the floors the
  checkpoint records, each overridable (``--min-probe-bit-acc``, ``--min-probe-psnr``; as
  ``distributor.screen_by=probe``), or by the checkpoint's read predictor (``--screen predicted``,
  ``distributor/read_predictor.py``: as ``task=issue`` screens by default since 2026-12-06 late
  evening), or none (``--screen none``);
- each copy loaded with a plain ``diffusers.AutoencoderKL.from_pretrained(copy_dir)``, decoding
  ``--images`` held-out images (the seed the other probes read, not the screening probe's), saved
  as 8-bit pixels;
- every image attributed with ``distributor.attribution.attribute_images`` (soft decoding, fpr
  1e-6 over the registry) once every copy is issued, the screened codes' pass rate dividing the
  p-values as ``task=attribute`` divides them (the registry's count, or the checkpoint's fitted
  rate where smaller: ``screening.bound_pass_rate``); PSNR of each copy's outputs against
  the base decoder's;
- the base decoder's (unmarked) outputs attributed too: how many are accused.

    python experiments/default_condition.py --users 32 --screen predicted  # as task=issue issues
    python experiments/default_condition.py --users 32                     # distributor.screen_by=probe
    python experiments/default_condition.py --users 32 --screen none

Prints a table per user and the totals; the row is appended to ``results/default_condition.jsonl``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from diffusers.utils import logging as diffusers_logging

from fingerprint_lm.distributor.attribution import attribute_images
from fingerprint_lm.distributor.copies import issue_copy
from fingerprint_lm.distributor.generation import decode_with, held_out_images
from fingerprint_lm.distributor.issue_screens import choose_screen, make_screen, screen_report
from fingerprint_lm.distributor.screening import bound_pass_rate
from fingerprint_lm.errors import ConfigError, check_float, check_int, check_probability, exit_on_user_error
from fingerprint_lm.metrics.quality import psnr
from fingerprint_lm.models.checkpoint import load_fingerprint_model, shipped_checkpoint
from fingerprint_lm.pixels import from_uint8, to_uint8
from fingerprint_lm.registry.store import open_registry
from fingerprint_lm.storage import append_jsonl

RESULTS = Path(__file__).resolve().parent / "results" / "default_condition.jsonl"
EVAL_SEED = 5  # the held-out images the other pnm probes read (the screening probe uses another seed)
SECRET = b"default-condition-probe"


def _attributed(model, index, rate: float | None, images: torch.Tensor, fpr: float) -> dict:
    """As task=attribute reads them: the registry's codes (``index``) at the pass rate the task
    divides by (``rate``: ``screening.bound_pass_rate``)."""
    named = [(f"image{i}", image) for i, image in enumerate(images)]
    return attribute_images(model.reader, index, named, fpr=fpr, decoding="soft", screen_pass_rate=rate)


@torch.no_grad()
def measure(args: argparse.Namespace, workdir: Path) -> dict:
    model = load_fingerprint_model(shipped_checkpoint(args.checkpoint))
    images = held_out_images(int(model.meta.get("resolution", 32)), args.images, seed=EVAL_SEED)
    base = decode_with(model.vae, model.unmarked_vae, images)
    rng = np.random.default_rng(args.seed)
    users, marked_images = [], []
    with open_registry(workdir / "registry.sqlite", model.fingerprint_bits, 8, create=True,
                       method=model.method) as registry:
        for i in range(args.registry - args.users):
            registry.register_new(f"innocent{i}", rng)
        # the screen task=issue builds for the same settings (distributor/issue_screens.py)
        overridden = args.min_probe_bit_acc is not None or args.min_probe_psnr is not None
        kind = choose_screen(model, "predicted" if args.screen == "predicted" else "probe", args.screen != "none",
                             overridden)
        screen = make_screen(kind, model, registry, args.min_probe_bit_acc, args.min_probe_psnr, max_draws=1000)
        floors = tuple(screen_report(screen)["screen"].values()) if screen else (None, None)
        for u in range(args.users):
            issued = issue_copy(model, registry, f"user{u}", workdir / "copies", secret=SECRET, act_type="all",
                                rng=rng, draw_code=screen)
            copy = AutoencoderKL.from_pretrained(issued["copy"]).eval()  # what a diffusers user does
            decoded = decode_with(model.vae, copy, images)
            marked_images.append(marked := from_uint8(to_uint8(decoded)))
            code = registry.get(f"user{u}")["code"]
            users.append({
                "user": f"user{u}",
                "draws": screen.draws if screen else 1,
                "probe_bit_acc": getattr(screen, "probe_bit_acc", None),
                "probe_psnr": getattr(screen, "probe_psnr", None),
                "predicted_bit_acc": getattr(screen, "predicted_bit_acc", None),
                "bit_acc": float(((model.reader(marked) > 0).numpy() == np.asarray(code, dtype=bool)).mean()),
                "psnr": float(psnr(decoded, base).mean()),
            })
        index, rate = registry.index(), bound_pass_rate(registry.screen_pass_rate(), model.meta.get("issue_screen"))
        for user, marked in zip(users, marked_images, strict=True):  # at the registry's final pass rate
            rows = _attributed(model, index, rate, marked, args.fpr)["images"]
            user["attributed"] = float(np.mean([r["accused"] and r["user_id"] == user["user"] for r in rows]))
            user["wrong"] = int(sum(r["accused"] and r["user_id"] != user["user"] for r in rows))
        unmarked_read = _attributed(model, index, rate, from_uint8(to_uint8(base)), args.fpr)
        unmarked = sum(r["accused"] for r in unmarked_read["images"])
    attributed = np.array([u["attributed"] for u in users])
    quality = np.array([u["psnr"] for u in users])
    return {"date": time.strftime("%Y-%m-%d"), **vars(args), "floors": list(floors), "per_user": users,
            "attributed": float(attributed.mean()), "worst_user_attributed": float(attributed.min()),
            "wrong_accusations": int(sum(u["wrong"] for u in users)), "unmarked_accused": int(unmarked),
            "mean_psnr": float(quality.mean()), "min_psnr": float(quality.min()),
            "users_at_30db": float((quality >= 30).mean()),
            "mean_draws": float(np.mean([u["draws"] for u in users])),
            "screen_pass_rate": unmarked_read["screen_pass_rate"],
            "bit_acc": float(np.mean([u["bit_acc"] for u in users]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="embedded_pnm")
    parser.add_argument("--users", type=int, default=32)
    parser.add_argument("--registry", type=int, default=1000)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--fpr", type=float, default=1e-6)
    parser.add_argument("--screen", choices=("checkpoint", "predicted", "none"), default="checkpoint",
                        help="checkpoint: the probe floors it records (distributor.screen_by=probe); predicted: its "
                             "read predictor, as task=issue screens by default; none: unscreened codes")
    parser.add_argument("--min-probe-bit-acc", type=float, default=None, help="overrides the recorded bit floor")
    parser.add_argument("--min-probe-psnr", type=float, default=None, help="overrides the recorded PSNR floor")
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args()
    check_int("--users", args.users)
    check_int("--registry", args.registry, args.users)
    check_int("--images", args.images)
    check_probability("--fpr", args.fpr)
    if args.screen == "predicted" and (args.min_probe_bit_acc is not None or args.min_probe_psnr is not None):
        raise ConfigError("--min-probe-bit-acc / --min-probe-psnr set the probe screen's floors; --screen predicted "
                          "keeps the predictor's thresholds")
    if args.min_probe_bit_acc is not None:
        check_float("--min-probe-bit-acc", args.min_probe_bit_acc, above=0.0, maximum=1.0)
    if args.min_probe_psnr is not None:
        check_float("--min-probe-psnr", args.min_probe_psnr, above=0.0)
    diffusers_logging.set_verbosity_error()  # one "accelerate not found" notice per stock load otherwise
    started = time.time()
    with tempfile.TemporaryDirectory() as workdir:
        row = measure(args, Path(workdir))
    row["seconds"] = round(time.time() - started, 1)
    print("| user | draws | probe bit_acc | probe PSNR | held-out bit_acc | PSNR dB | attributed | wrong |\n"
          "|---|---|---|---|---|---|---|---|")
    for u in row["per_user"]:
        probe = "-" if u["probe_bit_acc"] is None else f"{u['probe_bit_acc']:.3f}"
        probe_psnr = "-" if u["probe_psnr"] is None else f"{u['probe_psnr']:.2f}"
        print(f"| {u['user']} | {u['draws']} | {probe} | {probe_psnr} | {u['bit_acc']:.3f} | {u['psnr']:.2f} | "
              f"{u['attributed']:.3f} | {u['wrong']} |")
    print(f"\n{args.checkpoint}, {args.users} stock-loaded copies x {args.images} images, registry {args.registry}, "
          f"screen floors {row['floors']}: attributed {row['attributed']:.4f} (worst user "
          f"{row['worst_user_attributed']:.3f}), wrong {row['wrong_accusations']}, unmarked accused "
          f"{row['unmarked_accused']}/{args.images}; PSNR mean {row['mean_psnr']:.2f} dB (min {row['min_psnr']:.2f}, "
          f"{row['users_at_30db']:.0%} of copies >= 30 dB); bit_acc {row['bit_acc']:.3f}; "
          f"draws per copy {row['mean_draws']:.2f} (p-values divided by the pass rate "
          f"{row['screen_pass_rate']:.3f}); {row['seconds']:.0f} s")
    append_jsonl(RESULTS, row)


if __name__ == "__main__":
    exit_on_user_error(main)
