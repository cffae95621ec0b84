"""The README's "what the mark looks like" figure: base decoder vs a user's copy on held-out images.

Issues a copy for one user from a checkpoint (default: the shipped one) into a temporary folder,
loads it back the way a user does (``load_copy``: stock diffusers + the bias map), decodes the same
held-out images with the base decoder and with the copy, and writes a 3-row grid: base, copy,
|difference| x5 (each image upscaled 4x, nearest neighbour). Prints the PSNR of the copy vs the
base on those images.

    python experiments/base_vs_copy.py [--checkpoint DIR] [--out experiments/results/base_vs_copy.png]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from fingerprint_lm.distributor.copies import issue_copy, load_copy
from fingerprint_lm.distributor.generation import decode_with, held_out_images
from fingerprint_lm.errors import exit_on_user_error
from fingerprint_lm.metrics.quality import psnr
from fingerprint_lm.models.checkpoint import load_fingerprint_model
from fingerprint_lm.pixels import to_uint8
from fingerprint_lm.registry.store import Registry

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--out", default=str(ROOT / "experiments" / "results" / "base_vs_copy.png"))
    parser.add_argument("--n-images", type=int, default=6)
    parser.add_argument("--upscale", type=int, default=4)
    args = parser.parse_args()
    model = load_fingerprint_model(args.checkpoint)
    images = held_out_images(int(model.meta.get("resolution", 32)), args.n_images)
    with tempfile.TemporaryDirectory() as tmp:
        registry = Registry(Path(tmp) / "registry.sqlite", model.fingerprint_bits)
        issue_copy(model, registry, "bob", Path(tmp) / "copies", secret=b"figure-secret",
                   rng=np.random.default_rng(0))
        registry.close()
        copy = load_copy(Path(tmp) / "copies" / "bob")
        base_out = decode_with(model.vae, model.unmarked_vae, images)
        copy_out = decode_with(model.vae, copy, images)
    difference = ((copy_out - base_out).abs() * 5).clamp(0, 2) - 1  # |diff| x5, shown on [-1, 1]
    rows = [np.concatenate(list(to_uint8(x)), axis=1) for x in (base_out, copy_out, difference)]
    grid = np.concatenate(rows, axis=0).repeat(args.upscale, axis=0).repeat(args.upscale, axis=1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(args.out)
    print(f"wrote {args.out}: copy vs base PSNR {psnr(copy_out, base_out).mean():.2f} dB "
          f"on {args.n_images} held-out images")


if __name__ == "__main__":
    exit_on_user_error(main)
