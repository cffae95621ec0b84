"""Read a pnm mark against the base VAE's re-encoding of the same image, and train for it (issue 11).

The distributor holds the base VAE, so for a suspect image ``y`` it can compute ``r = D0(E(y))``:
the content, with little of the mark (``results/mark_readability.md``: 38.5 dB re-encoding error).
The band reader's whitening is affine, so ``ext(y) - ext(r)`` cancels the content's own logits:
on unmarked images their spread drops from 2.96 to 0.72. A model trained for plain reading reads
*worse* that way (0.846 against 0.887), even against the exact unmarked image (0.861). Training
with plain reading writes only the bits the content does not already give, so a difference
loses the bits the content gave for free. This probe trains for the difference instead.

Both arms warm-start from the shipped checkpoint with ``lr_warmdown_probe``'s continuation:
``--warmup`` steps at constant rates, then every rate warmed down to 0 over ``--steps``, the reader
training throughout.

- ``plain``: the recipe as it is, the control.
- ``differential``: the fingerprint loss, and the worst-case term's, on ``ext(y) - ext(D0(E(y)))``.
  The re-encoding is computed without a gradient: none flows through the encoder.

Each trained model is read both ways (re-whitened on unmarked images, as shipped) on 512 held-out
images with a fresh code each, clean and under the attacks of ``PROBES``:

    python experiments/differential_reader_probe.py

Rows are appended to ``results/differential_reader_probe.jsonl``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from lr_warmdown_probe import continue_training
from mark_readability import accuracy, images
from torch.nn import functional as F

from fingerprint_lm.attacks.cases import ROBUSTNESS_SUITE, image_case
from fingerprint_lm.data.datamodule import TEST_SEED_OFFSET
from fingerprint_lm.errors import ConfigError, check_int, exit_on_user_error
from fingerprint_lm.lit.stages import encode_latents
from fingerprint_lm.metrics.quality import psnr
from fingerprint_lm.models import batched
from fingerprint_lm.storage import append_jsonl

RESULTS = Path(__file__).resolve().parent / "results" / "differential_reader_probe.jsonl"
ARMS = ("plain", "differential")
# a few cases of the one robustness suite: the columns this probe's recorded results have
PROBES = ("shift_8", "crop_0.5", "crop_resize_0.5", "jpeg_q90", "jpeg_q50", "gaussian_blur_s1", "brightness_1.5")
assert set(PROBES) <= set(ROBUSTNESS_SUITE), set(PROBES) - set(ROBUSTNESS_SUITE)


def differential_training(module) -> None:
    """Make the module's fingerprint loss (clean and worst-case passes) read ``y`` against the
    reference decoder's re-encoding of it."""
    reader = module.extractor

    def loss(outputs: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            reencoded = module.reference(module.encode(outputs.detach().float())).float()
        logits = reader(outputs.float()) - reader(reencoded)
        return F.binary_cross_entropy_with_logits(logits.float(), bits.float())

    module.fingerprint_loss = loss


@torch.no_grad()
def readings(model, n: int = 512, seed: int = 12345) -> dict[str, float]:
    """Held-out bit accuracy read plainly and against the re-encoding, clean and per attack."""
    reference, reader = model.reference_vae, model.extractor.eval()
    model.pnm.eval()

    def reencoded(batch: torch.Tensor) -> torch.Tensor:
        return batched.decode(reference, batched.encode(reference, batch, batch_size=256), batch_size=256)

    x = images(TEST_SEED_OFFSET, n, int(model.meta.get("resolution", 32)))
    latents = encode_latents(reference, x)
    bits = torch.randint(0, 2, (n, model.fingerprint_bits), generator=torch.Generator().manual_seed(seed))
    marked = model.pnm(latents, bits)
    out = {"readings_psnr": psnr(marked, reference.decode(latents).sample).mean().item()}
    for case in ("clean", *PROBES):
        y = marked if case == "clean" else image_case(case)(marked, torch.Generator().manual_seed(seed + 1))
        plain = reader(y)
        out[f"plain/{case}"] = accuracy(plain, bits)
        out[f"differential/{case}"] = accuracy(plain - reader(reencoded(y)), bits)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="embedded_pnm")
    parser.add_argument("--steps", type=int, default=1200, help="warm-down steps after the warm-up")
    parser.add_argument("--warmup", type=int, default=300, help="steps at constant rates first")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of: {', '.join(ARMS)}")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    check_int("--steps", args.steps)
    check_int("--warmup", args.warmup, 0)
    arms = args.arms.split(",")
    if not arms or set(arms) - set(ARMS):
        raise ConfigError(f"--arms takes {', '.join(ARMS)}, got {args.arms!r}")
    rows = []
    for arm in arms:
        row = continue_training(args.checkpoint, "warmdown", args.steps, args.warmup, args.seed,
                                prepare=differential_training if arm == "differential" else None, measure=readings)
        row["arm"] = arm
        rows.append(row)
        append_jsonl(RESULTS, row)
    print(f"{args.warmup} steps at constant rates, then {args.steps} warmed down to 0; 512 held-out images")
    print("| arm (trained for) | train s | PSNR dB | read | clean | " + " | ".join(PROBES) + " |")
    print("|---" * (5 + len(PROBES)) + "|")
    for r in rows:
        for reading in ("plain", "differential"):
            figures = " | ".join(f"{r[f'{reading}/{case}']:.3f}" for case in ("clean", *PROBES))
            print(f"| {r['arm']} | {r['train_seconds']:.0f} | {r['readings_psnr']:.2f} | {reading} | {figures} |")


if __name__ == "__main__":
    exit_on_user_error(main)
