"""A stock-weight fingerprint read by a fixed band-energy reader (issue 11, recipe search).

Learned pooled readers start from nothing and stalled near 0.6-0.69 here, even with the shared
decoder fine-tuned and PSNR at 7 dB (``stock_recipe_probe.py --decoder-lr``). This probe gives the
generator side a readable target from step 0, the way the carrier tiles do, but shift-invariant:
bit ``i`` is the energy of the image in a secret band: a 7x7 Gabor pair (cos and sin, so the
energy does not depend on phase) at a secret frequency and orientation, applied to a secret colour
direction. ``logit_i = gain * (log E_i - mu_i) / sigma_i`` with ``mu``, ``sigma`` measured on
unmarked base-decoder outputs: threshold 0 means "more energy than an unmarked image in that band".
The energy is a mean over valid positions, so it is invariant to a shift and changes little under
a crop; any image of 7 px or more can be read.

Only the generator trains: the private mapping network (code -> bounded relative changes of 17
decoder GroupNorms' affine: stock weights), and with ``--decoder-lr`` > 0 the shared decoder too
(one decoder for all users, WOUAF-style). Image loss: a Lagrangian weight that rises while PSNR
is below ``--psnr-target`` (on from step 0).

    python experiments/band_energy_probe.py --steps 600 --decoder-lr 1e-4

``--reader-lr`` > 0 makes the reader learned but warm-started: its Gabor filters start as the
secret bank and train with the generator (the reader stays conv + mean pooling, so still
shift-invariant); ``mu`` and ``sigma`` are re-measured on the same clean batch every 50 steps,
so unmarked images keep reading as balanced bits while the filters move.

    python experiments/band_energy_probe.py --steps 1000 --decoder-lr 5e-4 --reader-lr 1e-3

Held-out evaluation (256 images, fresh codes): bit accuracy, PSNR vs the base decoder, bit
accuracy after a 3-px shift and after a 50% crop without resize. Rows go to
``results/band_energy_probe.jsonl``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stock_recipe_probe import ALL_NORMS, BoundedPNM, batches, mark_batch  # noqa: E402

from fingerprint_lm.data.datamodule import TEST_SEED_OFFSET  # noqa: E402
from fingerprint_lm.data.synthetic import ProceduralImages  # noqa: E402
from fingerprint_lm.errors import exit_on_user_error  # noqa: E402
from fingerprint_lm.metrics.quality import psnr  # noqa: E402
from fingerprint_lm.models.checkpoint import SHIPPED_CHECKPOINT  # noqa: E402
from fingerprint_lm.models.pooled_extractor import band_log_energy, gabor_bank  # noqa: E402
from fingerprint_lm.models.vae import load_vae  # noqa: E402
from fingerprint_lm.storage import append_jsonl

RESULTS = Path(__file__).resolve().parent / "results" / "band_energy_probe.jsonl"


class BandEnergyReader(nn.Module):
    """Fixed secret Gabor bands (the shipped BandEnergyExtractor's bank, plus an optional second
    orientation per bit); per image the log energy in each, standardised on clean images (the
    shipped extractor whitens instead)."""

    def __init__(self, bits: int, size: int = 7, freq: tuple[float, float] = (0.12, 0.35), seed: int = 5,
                 differential: bool = False):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        radius = freq[0] + (freq[1] - freq[0]) * torch.rand(bits, generator=g)  # cycles per pixel
        angle = math.pi * torch.rand(bits, generator=g)
        colour = F.normalize(torch.randn(bits, 3, generator=g), dim=1)
        self.differential = differential
        if differential:  # a second band per bit: same frequency and colour, orientation + 90 degrees
            radius, angle, colour = radius.repeat(2), torch.cat([angle, angle + math.pi / 2]), colour.repeat(2, 1)
        self.register_buffer("weight", gabor_bank(radius, angle, colour, size))
        self.register_buffer("mu", torch.zeros(bits))
        self.register_buffer("sigma", torch.ones(bits))
        self.gain = 3.0

    def log_energy(self, images: torch.Tensor) -> torch.Tensor:
        energy = band_log_energy(images, self.weight)  # valid positions only: a crop keeps the same statistic
        if self.differential:  # content's energy is about the same in both orientations: it cancels
            first, second = energy.chunk(2, dim=1)
            return first - second
        return energy

    @torch.no_grad()
    def standardise(self, clean: torch.Tensor) -> None:
        e = self.log_energy(clean)
        self.mu.copy_(e.mean(0))
        self.sigma.copy_(e.std(0).clamp_min(1e-3))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.gain * (self.log_energy(images) - self.mu) / self.sigma


def probe(args) -> dict:
    torch.manual_seed(args.seed)
    vae = load_vae(Path(args.checkpoint) / "base_vae").eval().requires_grad_(False)
    base = load_vae(Path(args.checkpoint) / "base_vae").eval().requires_grad_(False)
    pnm = BoundedPNM(vae.decoder, args.bits, affine_sites=ALL_NORMS, spatial_site=None,
                     mapping_hidden=args.mapping_hidden, post_quant_conv=vae.post_quant_conv)
    pnm.bound = args.bound
    reader = BandEnergyReader(args.bits, size=args.filter_size, seed=args.seed + 5, differential=args.differential)
    data = batches(args.resolution, 256, seed=args.seed + 1000)
    with torch.no_grad():
        clean = base.decode(base.encode(next(data)).latent_dist.mode()).sample
        reader.standardise(clean)
    trainable = [p for n, p in pnm.named_parameters() if not n.startswith(("decoder.", "post_quant_conv."))]
    groups = [{"params": trainable, "lr": args.lr}]
    if args.reader_lr > 0:  # warm start: the secret bank is where the filters begin, not where they stay
        reader.weight = nn.Parameter(reader.weight.detach().clone())
        groups.append({"params": [reader.weight], "lr": args.reader_lr})
    if args.decoder_lr > 0:
        pnm.decoder.requires_grad_(True)
        groups.append({"params": pnm.decoder.parameters(), "lr": args.decoder_lr})
    optimizer = torch.optim.Adam(groups)
    image_weight, start, history = 0.0, time.perf_counter(), []
    data = batches(args.resolution, args.batch_size, seed=args.seed)
    for step in range(args.steps):
        if args.reader_lr > 0 and step % 50 == 0:
            with torch.no_grad():
                reader.standardise(clean)
        _, reference, bits, marked = mark_batch(vae, base, pnm, next(data), args.bits)
        logits = reader(marked)
        message = F.binary_cross_entropy_with_logits(logits, bits)
        mse = F.mse_loss(marked, reference)
        current = psnr(marked.detach(), reference).mean().item()
        image_weight = max(0.0, image_weight + args.weight_lr * (args.psnr_target - current))
        loss = message + image_weight * mse
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 50 == 0 or step == args.steps - 1:
            acc = ((logits > 0).float() == bits).float().mean().item()
            history.append({"step": step, "bit_acc": round(acc, 4), "psnr": round(current, 2),
                            "seconds": round(time.perf_counter() - start, 1)})
            print(f"  step {step}: train bit_acc {acc:.3f} psnr {current:.2f} dB weight {image_weight:.1f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)
    seconds = time.perf_counter() - start
    if args.reader_lr > 0:
        with torch.no_grad():
            reader.standardise(clean)
    return {**vars(args), "train_seconds": round(seconds, 1), **evaluate(pnm, vae, base, reader, args),
            "history": history}


@torch.no_grad()
def evaluate(pnm, vae, base, reader, args, n: int = 256) -> dict:
    held_out = ProceduralImages(args.resolution, seed=TEST_SEED_OFFSET, length=n)
    images = torch.stack([held_out.sample(i)["image"] for i in range(n)])
    bits = torch.randint(0, 2, (n, args.bits), generator=torch.Generator().manual_seed(99)).float()
    accs, shifted, cropped, clean_bits, psnrs = [], [], [], [], []
    half = round(args.resolution / math.sqrt(2))
    for chunk in range(0, n, 64):
        x, b = images[chunk : chunk + 64], bits[chunk : chunk + 64]
        latents = vae.encode(x).latent_dist.mode()
        marked, unmarked = pnm(latents, b), base.decode(latents).sample
        psnrs.append(psnr(marked, unmarked))
        accs.append(((reader(marked) > 0).float() == b).float().mean(1))
        shifted.append(((reader(marked[..., 3:, 3:]) > 0).float() == b).float().mean(1))
        cropped.append(((reader(marked[..., :half, :half]) > 0).float() == b).float().mean(1))
        clean_bits.append((reader(unmarked) > 0).float().mean(1))
    return {"bit_acc": torch.cat(accs).mean().item(), "psnr": torch.cat(psnrs).mean().item(),
            "bit_acc_shift3": torch.cat(shifted).mean().item(), "bit_acc_crop0.5": torch.cat(cropped).mean().item(),
            "clean_ones_share": torch.cat(clean_bits).mean().item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=str(SHIPPED_CHECKPOINT))
    parser.add_argument("--bits", type=int, default=48)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--decoder-lr", type=float, default=0.0)
    parser.add_argument("--mapping-hidden", type=int, default=256)
    parser.add_argument("--filter-size", type=int, default=7)
    parser.add_argument("--psnr-target", type=float, default=30.0)
    parser.add_argument("--weight-lr", type=float, default=1.0)
    parser.add_argument("--reader-lr", type=float, default=0.0,
                        help="> 0: train the reader's filters from the secret bank")
    parser.add_argument("--bound", type=float, default=0.5, help="largest relative change per channel")
    parser.add_argument("--differential", action="store_true",
                        help="read each bit as the log ratio of two orthogonal orientations")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    row = probe(args)
    print(f"bit_acc {row['bit_acc']:.4f} psnr {row['psnr']:.2f} dB shift3 {row['bit_acc_shift3']:.4f} "
          f"crop0.5 {row['bit_acc_crop0.5']:.4f} clean ones {row['clean_ones_share']:.3f} ({row['train_seconds']} s)")
    append_jsonl(RESULTS, row)


if __name__ == "__main__":
    exit_on_user_error(main)
