"""How wide is the channel a stock-weight fingerprint can use? (issue 11: "measure early what
widens the channel").

A copy may only change stock AutoencoderKL parameters. This script measures, per held-out image,
the image-space Jacobian of the base decoder with respect to candidate modulation spaces at zero
modulation (the base decoder):

- ``gn_affine``: the affine weight/bias of every decoder GroupNorm, as relative changes
  (``gamma (1 + a)``, ``beta + b``);
- ``conv_in_scale``: WOUAF-style input-channel scales of every decoder conv (``W[:, c] (1 + s_c)``);
- ``both``.

For each it prints the singular-value spread of J (images x space): the entropy effective rank
``exp(H(sigma / sum sigma))`` and how many singular values exceed 10% / 3% of the largest. A
48-bit code needs about 48 directions that a reader can tell apart in every image; directions
10-30x weaker than the strongest drown in content. Measured on the trained decoder only (a random
decoder's rank says nothing about a trained one).

    python experiments/stock_channel_rank.py                      # shipped base VAE, 32 px
    python experiments/stock_channel_rank.py --resolution 64      # same decoder, 64 px images

Rows are appended to ``experiments/results/stock_channel_rank.jsonl``.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from torch.func import functional_call, jacrev

from fingerprint_lm.data.datamodule import TEST_SEED_OFFSET
from fingerprint_lm.data.synthetic import ProceduralImages
from fingerprint_lm.errors import exit_on_user_error
from fingerprint_lm.models.checkpoint import SHIPPED_CHECKPOINT
from fingerprint_lm.models.vae import load_vae
from fingerprint_lm.storage import append_jsonl

RESULTS = Path(__file__).resolve().parent / "results" / "stock_channel_rank.jsonl"


def modulation_sites(decoder: torch.nn.Module, space: str) -> list[tuple[str, str]]:
    """``(parameter name, kind)`` pairs the space modulates: kind ``gamma``/``beta``/``conv_in``."""
    sites = []
    for name, module in decoder.named_modules():
        if space in ("gn_affine", "both") and isinstance(module, torch.nn.GroupNorm):
            sites += [(f"{name}.weight", "gamma"), (f"{name}.bias", "beta")]
        if space in ("conv_in_scale", "both") and isinstance(module, torch.nn.Conv2d):
            sites.append((f"{name}.weight", "conv_in"))
    return sites


def modulation_size(params: dict[str, torch.Tensor], sites) -> int:
    return sum(params[n].shape[1] if kind == "conv_in" else params[n].numel() for n, kind in sites)


def modulated(params: dict[str, torch.Tensor], sites, vector: torch.Tensor) -> dict[str, torch.Tensor]:
    """The decoder's parameters with the modulation ``vector`` applied (zero = unchanged)."""
    out = dict(params)
    offset = 0
    for name, kind in sites:
        base = out[name]
        size = base.shape[1] if kind == "conv_in" else base.numel()
        part = vector[offset : offset + size]
        offset += size
        if kind == "gamma":
            out[name] = base * (1 + part)
        elif kind == "beta":
            out[name] = base + part
        else:
            out[name] = base * (1 + part)[None, :, None, None]
    return out


def spread(singular_values: torch.Tensor) -> dict[str, float]:
    s = singular_values / singular_values.sum()
    entropy = -(s * torch.log(s.clamp_min(1e-30))).sum().item()
    top = singular_values[0]
    return {
        "effective_rank": math.exp(entropy),
        "above_10pct": int((singular_values > 0.1 * top).sum()),
        "above_3pct": int((singular_values > 0.03 * top).sum()),
    }


def measure(vae, images: torch.Tensor, space: str) -> dict:
    decoder = vae.decoder
    params = {k: v.detach() for k, v in decoder.named_parameters()}
    sites = modulation_sites(decoder, space)
    size = modulation_size(params, sites)
    with torch.no_grad():
        latents = vae.encode(images).latent_dist.mode()
    per_image = []
    for latent in latents:

        def render(vector, latent=latent):
            return functional_call(decoder, modulated(params, sites, vector), (latent[None],)).flatten()

        jacobian = jacrev(render, chunk_size=256)(torch.zeros(size))
        per_image.append(spread(torch.linalg.svdvals(jacobian)))
    mean = {key: sum(r[key] for r in per_image) / len(per_image) for key in per_image[0]}
    return {"space": space, "modulation_size": size, **mean,
            "min_above_10pct": min(r["above_10pct"] for r in per_image),
            "max_above_10pct": max(r["above_10pct"] for r in per_image)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=str(SHIPPED_CHECKPOINT), help="fingerprint model dir (its base_vae/)")
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--spaces", nargs="+", default=["gn_affine", "conv_in_scale", "both"])
    parser.add_argument("--label", default="")
    args = parser.parse_args()
    torch.manual_seed(0)
    vae = load_vae(Path(args.checkpoint) / "base_vae").eval()
    held_out = ProceduralImages(args.resolution, seed=TEST_SEED_OFFSET, length=args.images)
    images = torch.stack([held_out.sample(i)["image"] for i in range(args.images)])
    print("| space | modulation values | effective rank | sigma > 10% (min-max) | sigma > 3% | seconds |")
    print("|---|---|---|---|---|---|")
    for space in args.spaces:
        start = time.perf_counter()
        row = measure(vae, images, space)
        row.update(resolution=args.resolution, n_images=args.images, label=args.label,
                   checkpoint=args.checkpoint, seconds=round(time.perf_counter() - start, 1))
        print(f"| {space} | {row['modulation_size']} | {row['effective_rank']:.1f} | "
              f"{row['above_10pct']:.1f} ({row['min_above_10pct']}-{row['max_above_10pct']}) | "
              f"{row['above_3pct']:.1f} | {row['seconds']} |")
        append_jsonl(RESULTS, row)


if __name__ == "__main__":
    exit_on_user_error(main)
