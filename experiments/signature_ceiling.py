"""Is 32 px the ceiling, or pnm's shared channel? A whole decoder fine-tuned for one user's code
(Stable Signature's recipe, every decoder weight free) run far past its 100 steps (issue 11).

pnm writes every code through one mapping network into a few thousand stock values; Stable
Signature tunes all of a copy's decoder weights for its one code. If even that cannot reach 0.99
bit accuracy at 30 dB on the embedded default's 32 px images and reader, the scale is the ceiling
and no pnm recipe can meet issue 11's target here; if it can, the shared channel is the limit.

For ``--users`` random 48-bit codes and each ``--image-weights`` value, the base decoder (the
``embedded_pnm`` checkpoint's reference VAE: the decoder as it was) is fine-tuned with the
per-copy recipe of ``methods/stable_signature.py`` (AdamW lr 1e-3, batch 16, BCE on the frozen
reader's logits + ``weight`` x MSE against the base decoder's output, a pool of 256 procedural
images), reading with the checkpoint's trained band reader (``--reader shipped``) or its secret
bank before training (``--reader bank``). At each of ``--eval-steps`` the copy decodes 256
held-out images: bit accuracy for its code and PSNR against the base decoder. ``--resolution``
other than 32 runs the same decoder on larger images, the reader re-whitened on them first.

    python experiments/signature_ceiling.py

Prints a markdown table; rows are appended to ``results/signature_ceiling.jsonl``.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from fingerprint_lm.data.datamodule import TEST_SEED_OFFSET, check_resolution
from fingerprint_lm.data.synthetic import ProceduralImages
from fingerprint_lm.errors import ConfigError, check_int, exit_on_user_error
from fingerprint_lm.lit.stages import encode_latents
from fingerprint_lm.metrics.bits import bit_accuracy
from fingerprint_lm.metrics.quality import psnr
from fingerprint_lm.models.checkpoint import load_fingerprint_model, shipped_checkpoint
from fingerprint_lm.models.pooled_extractor import BandEnergyExtractor
from fingerprint_lm.models.vae import downscale_factor
from fingerprint_lm.storage import append_jsonl

RESULTS = Path(__file__).resolve().parent / "results" / "signature_ceiling.jsonl"


def latents_of(vae, seed: int, n: int, resolution: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Latents of ``n`` procedural images and the base decoder's output for them."""
    source = ProceduralImages(resolution, seed=seed, length=n)
    images = torch.stack([source.sample(i)["image"] for i in range(n)])
    with torch.no_grad():
        latents = encode_latents(vae, images).contiguous()
        return latents, vae.decode(latents).sample


def bank_reader(model, unmarked: torch.Tensor) -> BandEnergyExtractor:
    """The shipped reader's secret bank before training, whitened on unmarked decoder outputs."""
    settings = model.meta["extractor"]["band_energy"]
    reader = BandEnergyExtractor(model.fingerprint_bits, settings["filter_size"], tuple(settings["frequency"]),
                                 settings["seed"], settings["gain"])
    reader.fit_whitening(unmarked)
    return reader.eval()


def finetune(vae, reader, code: torch.Tensor, weight: float, eval_steps: list[int], pool, held_out, seed: int):
    """One copy's decoder fine-tuned for ``code``; a row per evaluation step."""
    (latents, base), (test_latents, test_base) = pool, held_out
    decoder = copy.deepcopy(vae.decoder).train().requires_grad_(True)
    post_quant = vae.post_quant_conv
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    target = code.float()
    rows, started = [], time.time()
    for step in range(1, max(eval_steps) + 1):
        batch = torch.randint(0, len(latents), (16,), generator=generator)
        out = decoder(post_quant(latents[batch]))
        logits = reader(out)
        loss = (F.binary_cross_entropy_with_logits(logits, target.expand_as(logits))
                + weight * F.mse_loss(out, base[batch]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step in eval_steps:
            with torch.no_grad():
                decoder.eval()
                out = torch.cat([decoder(post_quant(z)) for z in test_latents.split(64)])
                decoder.train()
                bit_acc = float(bit_accuracy((reader(out) > 0).numpy(), code.numpy()))
                rows.append({"steps": step, "bit_acc": bit_acc, "psnr": psnr(out, test_base).mean().item(),
                             "train_s": round(time.time() - started, 1)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=2)
    parser.add_argument("--image-weights", type=float, nargs="+", default=[100.0, 1000.0])
    parser.add_argument("--eval-steps", type=int, nargs="+", default=[100, 300, 1000, 3000])
    parser.add_argument("--reader", choices=["shipped", "bank"], default="shipped")
    parser.add_argument("--resolution", type=int, default=32)
    args = parser.parse_args()
    check_int("--users", args.users)
    check_int("--resolution", args.resolution, 16)
    for step in args.eval_steps:
        check_int("--eval-steps", step)
    if any(not w >= 0 for w in args.image_weights):
        raise ConfigError(f"--image-weights must be >= 0, got {args.image_weights}")
    torch.manual_seed(0)
    model = load_fingerprint_model(shipped_checkpoint("embedded_pnm"))
    model.extractor.bit_scale.fill_(1.0)  # fine-tune against the reader as trained, as measured before its calibration
    vae = model.reference_vae.eval()
    check_resolution(args.resolution, downscale_factor(vae))
    pool, held_out = latents_of(vae, 7, 256, args.resolution), latents_of(vae, TEST_SEED_OFFSET, 256, args.resolution)
    reader = model.extractor.eval() if args.reader == "shipped" else bank_reader(model, held_out[1])
    if args.resolution != 32:  # the shipped whitening was fitted at 32 px: refit it on this size's base outputs
        reader = copy.deepcopy(reader)
        reader.fit_whitening(held_out[1])
    reader.requires_grad_(False)
    codes = torch.randint(0, 2, (args.users, model.fingerprint_bits), generator=torch.Generator().manual_seed(11))
    print(f"| reader ({args.resolution} px) | image weight | user | "
          + " | ".join(f"{s} steps: bit_acc / PSNR" for s in sorted(args.eval_steps)) + " |")
    print("|---|---|---|" + "---|" * len(args.eval_steps))
    for weight in args.image_weights:
        for user, code in enumerate(codes):
            rows = finetune(vae, reader, code, weight, sorted(args.eval_steps), pool, held_out, seed=user)
            print(f"| {args.reader} | {weight:g} | {user} | "
                  + " | ".join(f"{r['bit_acc']:.3f} / {r['psnr']:.1f} dB" for r in rows) + " |", flush=True)
            record = {"reader": args.reader, "image_weight": weight, "user": user, "rows": rows,
                      "resolution": args.resolution,
                      "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d")}
            append_jsonl(RESULTS, record)


if __name__ == "__main__":
    exit_on_user_error(main)
