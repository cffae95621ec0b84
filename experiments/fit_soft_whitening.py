"""Fit the carrier reader's soft-decision whitening into a saved checkpoint (issue 13).

Training now fits it in its last hook (``CarrierMethod.after_fit``); a checkpoint written before
2026-12-05 has none (its soft weights are the raw logits). This runs the same fit
(:func:`fingerprint_lm.methods.carrier.fit_soft_whitening`) on the base decoder's outputs of the
first ``--images`` images of the procedural training stream (seed ``--seed``: the training
config's), and rewrites only ``fingerprint.safetensors``, ``fingerprint.json`` (which records the
fit) and ``SHA256SUMS``; the VAE folders keep their bytes. The shipped carrier checkpoint got its
whitening this way:

    python experiments/fit_soft_whitening.py fingerprint_lm/assets/embedded

Why: ``experiments/soft_weight_whitening.py`` (``results/soft_weight_whitening.md``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from fingerprint_lm.distributor.generation import training_images
from fingerprint_lm.errors import ConfigError, check_int, exit_on_user_error
from fingerprint_lm.methods.carrier import fit_soft_whitening
from fingerprint_lm.models import batched
from fingerprint_lm.models.checkpoint import load_fingerprint_model, rewrite_private_state


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--images", type=int, default=4096, help="conf/method/carrier.yaml's detector_fit_samples")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    check_int("--images", args.images)
    model = load_fingerprint_model(args.checkpoint)
    if model.method != "carrier":
        raise ConfigError(f"{args.checkpoint} is a {model.method} checkpoint; "
                          "only the carrier reader has a soft whitening")
    start = time.perf_counter()
    images = training_images(model.meta.get("resolution", 32), args.images, args.seed)
    with torch.no_grad():
        unmarked = batched.decode(model.unmarked_vae, batched.encode(model.vae, images))
    fit_soft_whitening(model.extractor, unmarked.split(256))
    model.meta = {**model.meta,
                  "soft_whitening": {"images": args.images, "seed": args.seed, "date": time.strftime("%Y-%m-%d")}}
    rewrite_private_state(model, args.checkpoint)
    print(f"{args.checkpoint}: soft whitening fitted on {args.images} unmarked images "
          f"in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    exit_on_user_error(main)
