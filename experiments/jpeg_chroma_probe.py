"""Probe (issue 11): where in colour does pnm's mark live, and is it JPEG's quantisation or its
chroma subsampling that erases it?

JPEG at quality 90 barely changes an image's luma, yet it takes the shipped pnm checkpoint's bit
accuracy from 0.917 to 0.66. PIL's JPEG (what the sweep's ``jpeg`` attack and most real uploads
use) also halves both chroma channels' resolution (4:2:0), and the reader's secret bands sit at
0.12-0.35 cycles per pixel, each along a colour direction of its own: whatever a band carries in
chroma above 0.25 cycles per pixel, subsampling removes. This decodes ``--images`` held-out images
with ``--users`` stock copies (ACT all) and reads their bits after each of:

- JPEG at quality 90 and 50, with PIL's 4:2:0 subsampling and with none (4:4:4);
- chroma subsampling alone (4:2:0 without quantisation: each chroma channel averaged over 2x2
  pixels and repeated back);
- the marked image's luma with the base decoder's chroma, and the reverse (BT.601 YCbCr, as JPEG's).

    python experiments/jpeg_chroma_probe.py --users 4 --images 256

Prints a markdown table; ``results/jpeg_chroma_probe.md`` keeps the run's table.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from soft_attribution import issue_copies

from fingerprint_lm.attacks.image import jpeg
from fingerprint_lm.distributor.generation import decode_with, held_out_images
from fingerprint_lm.errors import check_int, exit_on_user_error
from fingerprint_lm.models import batched
from fingerprint_lm.models.augment import rgb_to_ycbcr, ycbcr_to_rgb
from fingerprint_lm.models.checkpoint import load_fingerprint_model, shipped_checkpoint
from fingerprint_lm.pixels import from_uint8, to_uint8

RESULTS = Path(__file__).resolve().parent / "results"


def subsample_chroma(images: torch.Tensor) -> torch.Tensor:
    """4:2:0 without quantisation: Cb and Cr averaged over 2x2 pixels and repeated back."""
    channels = rgb_to_ycbcr(images)
    chroma = torch.nn.functional.avg_pool2d(channels[:, 1:], 2).repeat_interleave(2, -2).repeat_interleave(2, -1)
    return ycbcr_to_rgb(torch.cat([channels[:, :1], chroma], 1))


def swap_luma(luma_from: torch.Tensor, chroma_from: torch.Tensor) -> torch.Tensor:
    return ycbcr_to_rgb(torch.cat([rgb_to_ycbcr(luma_from)[:, :1], rgb_to_ycbcr(chroma_from)[:, 1:]], 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", nargs="+", default=["embedded_pnm"],
                        help="shipped checkpoint names or fingerprint_model folders")
    parser.add_argument("--users", type=int, default=4)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--seed", type=int, default=5)
    args = parser.parse_args()
    check_int("--users", args.users)
    check_int("--images", args.images)
    tables = [probe(checkpoint, args.users, args.images, args.seed) for checkpoint in args.checkpoint]
    print("\n\n".join(tables))
    (RESULTS / "jpeg_chroma_probe.md").write_text("\n\n".join(tables) + "\n")


@torch.no_grad()
def probe(checkpoint: str, users: int, n_images: int, seed: int) -> str:
    started = time.time()
    model = load_fingerprint_model(shipped_checkpoint(checkpoint))
    images = held_out_images(model.meta.get("resolution", 32), n_images, seed=seed)
    codes, _, outputs = issue_copies(model, users, users, images, seed)
    marked = torch.cat(outputs)
    base = decode_with(model.vae, model.unmarked_vae, images).repeat(users, 1, 1, 1)
    truth = codes[np.repeat(np.arange(users), n_images)]
    views = {
        "as decoded (8-bit pixels)": from_uint8(to_uint8(marked)),
        "JPEG 90, 4:2:0 (PIL's default; the sweep's attack)": jpeg(marked, 90),
        "JPEG 90, 4:4:4": jpeg(marked, 90, subsampling=0),
        "JPEG 50, 4:2:0": jpeg(marked, 50),
        "JPEG 50, 4:4:4": jpeg(marked, 50, subsampling=0),
        "chroma subsampled 4:2:0, no quantisation": subsample_chroma(marked),
        "marked luma, base chroma": swap_luma(marked, base),
        "base luma, marked chroma": swap_luma(base, marked),
    }
    lines = [f"{checkpoint}, {users} stock copies (ACT all) x {n_images} held-out images, "
             "hard bits\n", "| image | bit_acc |", "|---|---|"]
    for name, batch in views.items():
        logits = batched.extract(model.extractor, batch.clamp(-1, 1).contiguous(), "cpu").numpy()
        lines.append(f"| {name} | {float(((logits > 0) == truth).mean()):.3f} |")
    lines.append(f"\n`python experiments/jpeg_chroma_probe.py --checkpoint {checkpoint} --users {users} "
                 f"--images {n_images}`, {time.time() - started:.0f} s")
    return "\n".join(lines)


if __name__ == "__main__":
    exit_on_user_error(main)
