"""How much one user's copy reads depends on the user's code (issue 11, method=pnm).

The sweep and the README's targets table read *one* user's copy; the training run's evaluation
draws a fresh random code per image. For a weak mark the two differ, because some bits are easier
to move than others. This issues ``--users`` copies of a shipped checkpoint (ACT all), decodes the
same held-out images with each through a stock ``AutoencoderKL`` built from the copy's tensors,
and prints each user's bit accuracy and PSNR against the base decoder (as it was, when the
checkpoint ships ``reference_vae/``), then the mean, the spread and the random-code figure.

    python experiments/per_user_spread.py --checkpoint embedded_pnm --users 16

Rows are appended to ``results/per_user_spread.jsonl``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from fingerprint_lm.distributor.copies import decoder_from_tensors
from fingerprint_lm.distributor.generation import decode_with, held_out_images
from fingerprint_lm.errors import exit_on_user_error
from fingerprint_lm.methods.base import personal_tensors
from fingerprint_lm.metrics.quality import psnr
from fingerprint_lm.models.checkpoint import load_fingerprint_model, shipped_checkpoint
from fingerprint_lm.storage import append_jsonl

RESULTS = Path(__file__).resolve().parent / "results" / "per_user_spread.jsonl"


@torch.no_grad()
def spread(checkpoint: str, users: int, n_images: int, seed: int) -> dict:
    model = load_fingerprint_model(shipped_checkpoint(checkpoint))
    images = held_out_images(model.meta.get("resolution", 32), n_images, seed=seed)
    base = decode_with(model.vae, model.unmarked_vae, images)
    rng = np.random.default_rng(seed)
    accuracies, psnrs = [], []
    for _ in range(users):
        code = rng.integers(0, 2, model.fingerprint_bits, dtype=np.uint8)
        state = personal_tensors(model, code, "all", int(rng.integers(2**31)))
        marked = decode_with(model.vae, decoder_from_tensors(model.vae.config, *state), images)
        accuracies.append(float(((model.extractor(marked) > 0).numpy() == code).mean()))
        psnrs.append(float(psnr(marked, base).mean()))
    latents = model.vae.encode(images).latent_dist.mode()
    bits = torch.randint(0, 2, (n_images, model.fingerprint_bits), generator=torch.Generator().manual_seed(seed))
    random_codes = ((model.extractor(model.pnm(latents, bits)) > 0).long() == bits).float().mean().item()
    return {"date": time.strftime("%Y-%m-%d"), "checkpoint": checkpoint, "users": users, "images": n_images,
            "bit_acc": accuracies, "psnr": psnrs, "random_code_per_image_bit_acc": random_codes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="embedded_pnm")
    parser.add_argument("--users", type=int, default=16)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--seed", type=int, default=31)
    args = parser.parse_args()
    row = spread(args.checkpoint, args.users, args.images, args.seed)
    acc, quality = np.array(row["bit_acc"]), np.array(row["psnr"])
    print("| user | bit_acc | PSNR dB |\n|---|---|---|")
    for i, (a, q) in enumerate(zip(acc, quality)):
        print(f"| {i} | {a:.3f} | {q:.2f} |")
    print(f"\nmean bit_acc {acc.mean():.3f} (min {acc.min():.3f}, max {acc.max():.3f}, std {acc.std():.3f}); "
          f"mean PSNR {quality.mean():.2f} dB (min {quality.min():.2f}); "
          f"a random code per image: {row['random_code_per_image_bit_acc']:.3f}")
    append_jsonl(RESULTS, row)


if __name__ == "__main__":
    exit_on_user_error(main)
