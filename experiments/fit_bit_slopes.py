"""Fold per-bit calibration into a saved pnm checkpoint's reader (issue 11).

Training now fits it in its last hook (``PNMMethod.after_fit`` with ``method.bit_calibration_images``);
a pnm checkpoint written before 2026-12-06 has none (its soft weights are the plain whitened
logits). This runs the same fit (:func:`fingerprint_lm.methods.pnm.calibrate_bits`) on the first
``--images`` images of the procedural training stream (seed ``--seed``: the training config's),
each decoded under its own random code, and rewrites only ``fingerprint.safetensors``,
``fingerprint.json`` (its recipe records ``bit_calibration_images``, as a checkpoint trained with it
does, and the slopes' range is kept beside it) and ``SHA256SUMS``; the VAE folders keep their
bytes. The shipped pnm checkpoint got its calibration this way:

    python experiments/fit_bit_slopes.py fingerprint_lm/assets/embedded_pnm

A checkpoint is calibrated once: a second fit would scale the already calibrated logits again, so a
reader whose ``bit_scale`` is set is refused. Why calibrate: ``experiments/calibrated_soft_attribution.py``
(``results/calibrated_soft_attribution.md``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from fingerprint_lm.distributor.generation import training_images
from fingerprint_lm.errors import ConfigError, check_int, exit_on_user_error
from fingerprint_lm.methods.pnm import calibrate_bits
from fingerprint_lm.models.checkpoint import load_fingerprint_model, rewrite_private_state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--images", type=int, default=4096, help="conf/method/pnm.yaml's bit_calibration_images")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    check_int("--images", args.images)
    model = load_fingerprint_model(args.checkpoint)
    if model.method != "pnm":
        raise ConfigError(f"{args.checkpoint} is a {model.method} checkpoint; only pnm readers are calibrated per bit")
    if not torch.all(model.extractor.bit_scale == 1):
        raise ConfigError(f"{args.checkpoint} is calibrated already (its reader's bit_scale is set)")
    start = time.perf_counter()
    images = training_images(model.meta.get("resolution", 32), args.images, args.seed)
    slopes = calibrate_bits(model, images.split(256))
    model.meta = {**model.meta, "bit_calibration": {**slopes, "seed": args.seed, "date": time.strftime("%Y-%m-%d")}}
    if model.meta.get("recipe") is not None:  # a checkpoint from before recipes were recorded stays without one
        model.meta["recipe"] = {**model.meta["recipe"], "bit_calibration_images": args.images}
    rewrite_private_state(model, args.checkpoint)
    print(f"{args.checkpoint}: per-bit slopes {slopes['bit_slope_min']:.2f}-{slopes['bit_slope_max']:.2f} "
          f"(median {slopes['bit_slope_median']:.2f}) fitted on {args.images} marked images "
          f"in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    exit_on_user_error(main)
