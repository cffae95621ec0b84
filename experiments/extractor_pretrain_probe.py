"""Stage 1 of Stable Signature's split, on the embedded default (issue 11): can a shift-invariant
pooled extractor (fingerprint_lm/models/pooled_extractor.py) learn to read k bits here at all?

A throwaway image-space encoder (conv stack over the image and the code broadcast over the pixels,
output a residual bounded by ``--amplitude`` on [-1, 1] images) and the extractor train together on
procedural 32 px images with the message loss only, one augmentation per batch drawn from
``--augment`` (``none``; ``shift``: a random 0-7 px crop without resize; ``all``: shift, noise,
blur or brightness at p = 1). Earlier sessions measured this route stalling at 0.60 after 1300
steps with a GroupNorm extractor; this probe uses the BatchNorm one.

    python experiments/extractor_pretrain_probe.py --steps 600
    python experiments/extractor_pretrain_probe.py --steps 600 --augment all

Held-out evaluation (256 images, fresh codes): bit accuracy clean and after a 3-px shift, PSNR of
the encoded images. Rows are appended to ``experiments/results/extractor_pretrain_probe.jsonl``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from fingerprint_lm.data.datamodule import TEST_SEED_OFFSET
from fingerprint_lm.data.synthetic import ProceduralImages
from fingerprint_lm.errors import exit_on_user_error
from fingerprint_lm.metrics.quality import psnr
from fingerprint_lm.models.pooled_extractor import PooledExtractor
from fingerprint_lm.storage import append_jsonl

RESULTS = Path(__file__).resolve().parent / "results" / "extractor_pretrain_probe.jsonl"


class ThrowawayEncoder(nn.Module):
    """Image + code broadcast over the pixels -> a bounded residual (HiDDeN's encoder shape)."""

    def __init__(self, bits: int, width: int = 64, depth: int = 3, amplitude: float = 0.1):
        super().__init__()
        self.amplitude = amplitude
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.GELU())
        layers, prev = [], width + bits
        for _ in range(depth):
            layers += [nn.Conv2d(prev, width, 3, padding=1), nn.BatchNorm2d(width), nn.GELU()]
            prev = width
        self.body = nn.Sequential(*layers, nn.Conv2d(width, 3, 1))

    def forward(self, images: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
        code = (bits * 2 - 1)[:, :, None, None].expand(-1, -1, *images.shape[-2:])
        residual = self.body(torch.cat([self.stem(images), code], dim=1))
        return (images + self.amplitude * torch.tanh(residual)).clamp(-1, 1)


def augment(images: torch.Tensor, kind: str, generator: torch.Generator) -> torch.Tensor:
    if kind == "none":
        return images
    choice = "shift" if kind == "shift" else ["shift", "noise", "blur", "brightness"][
        int(torch.randint(0, 4, (1,), generator=generator))
    ]
    if choice == "shift":
        dy, dx = (int(v) for v in torch.randint(0, 8, (2,), generator=generator))
        return images[..., dy : dy + 24, dx : dx + 24]
    if choice == "noise":
        return (images + 0.1 * torch.randn(images.shape, generator=generator)).clamp(-1, 1)
    if choice == "blur":
        kernel = torch.tensor([0.25, 0.5, 0.25])
        kernel = (kernel[:, None] * kernel[None, :]).expand(3, 1, 3, 3)
        return F.conv2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    factor = float(torch.empty(1).uniform_(0.7, 1.3, generator=generator))
    return ((images + 1) * factor - 1).clamp(-1, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", type=int, default=48)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--amplitude", type=float, default=0.1)
    parser.add_argument("--augment", choices=["none", "shift", "all"], default="shift")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    encoder, extractor = ThrowawayEncoder(args.bits, amplitude=args.amplitude), PooledExtractor(args.bits)
    optimizer = torch.optim.Adam([*encoder.parameters(), *extractor.parameters()], lr=args.lr)
    stream, generator = ProceduralImages(32, seed=args.seed), torch.Generator().manual_seed(args.seed)
    start, history = time.perf_counter(), []
    for step in range(args.steps):
        images = torch.stack([stream.sample(step * args.batch_size + i)["image"] for i in range(args.batch_size)])
        bits = torch.randint(0, 2, (args.batch_size, args.bits), generator=generator).float()
        logits = extractor(augment(encoder(images, bits), args.augment, generator))
        loss = F.binary_cross_entropy_with_logits(logits, bits)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == args.steps - 1:
            acc = ((logits > 0).float() == bits).float().mean().item()
            history.append({"step": step, "bit_acc": round(acc, 4), "seconds": round(time.perf_counter() - start, 1)})
            print(f"  step {step}: train bit_acc {acc:.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
    train_seconds = time.perf_counter() - start
    encoder.eval()
    extractor.eval()
    with torch.no_grad():
        held_out = ProceduralImages(32, seed=TEST_SEED_OFFSET, length=256)
        images = torch.stack([held_out.sample(i)["image"] for i in range(256)])
        bits = torch.randint(0, 2, (256, args.bits), generator=torch.Generator().manual_seed(99)).float()
        marked = encoder(images, bits)
        clean = ((extractor(marked) > 0).float() == bits).float().mean().item()
        shifted = ((extractor(marked[..., 3:, 3:]) > 0).float() == bits).float().mean().item()
        quality = psnr(marked, images).mean().item()
    print(f"bit_acc {clean:.4f} (3-px shift {shifted:.4f}) at {quality:.2f} dB, {train_seconds:.0f} s")
    append_jsonl(RESULTS, {**vars(args), "bit_acc": clean, "bit_acc_shift3": shifted, "psnr": quality,
                           "train_seconds": round(train_seconds, 1), "history": history})


if __name__ == "__main__":
    exit_on_user_error(main)
