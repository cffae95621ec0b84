"""Probe (issue 11): does a cycle of training against the content reader teach the decoder to write
what that reader reads?

pnm trains its mapping network and shared decoder against the band reader (log energies in 48
secret bands, whitened); the distributor then reads found images with the content reader
(``models/content_reader.py``: the same bands, and their ratio to the image as the base VAE re-makes
it, through a readout fitted after training). The decoder never learned to write for that readout.
This continues the shipped pnm checkpoint for ``--steps`` steps of its second-cycle recipe
(``conf/method/pnm.yaml``: ``train`` with the first ``shipped_second_cycle``'s over it, worst-case term
included) with the fingerprint loss read by

- ``band``: the band reader, as the recipe does (the control: one more cycle of the same);
- ``content``: the shipped content reader, its re-made images under no gradient (the base VAE's
  re-encoding is a fixed map of the image, so the gradient reaches the decoder through the image's
  own band energies only), its readout fixed;

then refits the content reader with pnm.yaml's settings (``fit_content_reader``) and scores it on
``--images`` images of a procedural stream no fit saw, each under its own random code: bit
accuracy clean and under the robustness suite's attacks (8-bit pixels after each), and PSNR
against the base decoder. ``shipped`` scores the shipped checkpoint with its reader refitted the
same way (no training). One arm at a time, alone on the machine::

    python experiments/content_reader_training.py --steps 1000 --arms shipped,band,content

``--keep DIR`` saves each trained arm's model, its content reader refitted, as ``DIR/<arm>`` (a
checkpoint ``fingerprint_lm`` loads; the issue screen it records was fitted to the reader before).

Prints a markdown table; each arm's figures are appended to ``results/content_reader_training.jsonl``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import lightning as L
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from fingerprint_lm.attacks.cases import ROBUSTNESS_SUITE, image_case
from fingerprint_lm.data.synthetic import ProceduralImages
from fingerprint_lm.distributor.generation import training_images
from fingerprint_lm.errors import ConfigError, check_int, exit_on_user_error
from fingerprint_lm.lit.fingerprinting import FingerprintModule
from fingerprint_lm.methods.content_reader import check_content_reader_settings, fit_content_reader, fit_settings
from fingerprint_lm.methods.pnm import unmarked_outputs
from fingerprint_lm.metrics.quality import psnr
from fingerprint_lm.models import batched
from fingerprint_lm.models.augment import AugmentConfig
from fingerprint_lm.models.batched import evaluating
from fingerprint_lm.models.checkpoint import load_fingerprint_model, save_fingerprint_model, shipped_checkpoint
from fingerprint_lm.models.content_reader import LossReader
from fingerprint_lm.models.vae import encode_latents
from fingerprint_lm.pixels import from_uint8, to_uint8
from fingerprint_lm.storage import append_jsonl
from fingerprint_lm.tasks.compose import method_config

RESULTS = Path(__file__).resolve().parent / "results" / "content_reader_training.jsonl"
ARMS = ("shipped", "band", "content")
SCORED = ("clean", *ROBUSTNESS_SUITE)


def train_arm(model, arm: str, steps: int, seed: int, recipe) -> float:
    """Continue ``model`` for ``steps`` steps of the second-cycle recipe, the loss read by the
    ``arm``'s reader; returns the wall time."""
    cycles = OmegaConf.to_container(recipe.shipped_second_cycle)  # the band-read second cycle's rates: the first
    second = cycles[0] if isinstance(cycles, list) else cycles
    settings = {**OmegaConf.to_container(recipe.train), **second["train"]}
    model.pnm.train()
    if arm == "band":
        model.extractor.train().requires_grad_(True)
        extractor = model.extractor
    else:
        model.content_reader.eval()
        extractor = LossReader(model.content_reader)
    module = FingerprintModule(model.vae, model.pnm, extractor, augment=AugmentConfig(**recipe.augment),
                               reference_vae=model.reference_vae, **settings)
    started = time.perf_counter()
    if arm == "band":  # the frozen warm-down re-whitens the learned reader on these (PNMMethod.prepare_training)
        module.whitening_outputs = unmarked_outputs(module, training_images(32, recipe.detector_fit_samples, seed))
    stream = ProceduralImages(32, seed=seed + 1, length=steps * 32)
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, train_dataloaders=DataLoader(stream, batch_size=32))
    if module.whitening_outputs is not None:
        module.refresh_whitening()
    model.pnm.eval()
    model.extractor.eval()
    return time.perf_counter() - started


@torch.no_grad()
def score(model, images: torch.Tensor, seed: int) -> dict[str, float]:
    """The content reader's bit accuracy on ``images`` decoded under random codes, clean and per
    attack, and the mean PSNR against the base decoder."""
    reader, k = model.content_reader, model.fingerprint_bits
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2, (len(images), k), generator=generator)
    found, db = [], []
    with evaluating(model.vae, model.pnm, model.unmarked_vae, reader):
        for chunk, code in zip(images.split(128), codes.split(128)):
            latents = encode_latents(model.vae, chunk)
            out = model.pnm(latents, code).float()
            db.append(psnr(out, model.unmarked_vae.decode(latents).sample.float()))
            found.append(from_uint8(to_uint8(out)))
        found_all = torch.cat(found)
        figures = {"psnr": float(torch.cat(db).mean())}
        attack_generator = torch.Generator().manual_seed(seed + 1)
        for case in SCORED:
            attacked = found_all if case == "clean" else from_uint8(to_uint8(image_case(case)(found_all,
                                                                                         attack_generator)))
            logits = batched.extract(reader, attacked, batch_size=128)
            figures[case] = float(((logits > 0).long() == codes).float().mean())
    return figures


def run_arm(arm: str, args, recipe, held_out: torch.Tensor) -> dict:
    model = load_fingerprint_model(shipped_checkpoint("embedded_pnm"))
    train_seconds = 0.0 if arm == "shipped" else train_arm(model, arm, args.steps, args.seed, recipe)
    settings = check_content_reader_settings(OmegaConf.to_container(recipe.content_reader), model.fingerprint_bits)
    total = settings["unmarked_images"] + settings["train_images"] + settings["calibration_images"]
    fit = fit_content_reader(model, training_images(32, total, 0).split(256), **fit_settings(settings))
    row = {"arm": arm, "steps": 0 if arm == "shipped" else args.steps, "train_s": round(train_seconds),
           "fit_calibration_bit_acc": fit["calibration_bit_acc"], **score(model, held_out, args.seed + 7),
           "date": time.strftime("%Y-%m-%d %H:%M")}
    if args.keep is not None and arm != "shipped":
        model.meta["content_reader"] = fit
        model.meta.setdefault("made_by", []).append(
            f"python experiments/content_reader_training.py --steps {args.steps} --arms {arm} --seed {args.seed} "
            f"({row['date']}): {args.steps} more steps, the loss read by the {arm} reader, content reader refitted")
        save_fingerprint_model(model, args.keep / arm)
    append_jsonl(RESULTS, row)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {', '.join(ARMS)}")
    parser.add_argument("--images", type=int, default=512, help="held-out images scored per arm")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, default=None, help="save each trained arm's model as KEEP/<arm>")
    args = parser.parse_args()
    check_int("--steps", args.steps)
    check_int("--images", args.images)
    check_int("--seed", args.seed, 0)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if not arms or any(a not in ARMS for a in arms):
        raise ConfigError(f"--arms takes a comma-separated list of {', '.join(ARMS)}, got {args.arms!r}")
    recipe = method_config("pnm")
    held_out = torch.stack([ProceduralImages(32, seed=777_000 + args.seed, length=args.images).sample(i)["image"]
                            for i in range(args.images)])
    rows = [run_arm(arm, args, recipe, held_out) for arm in arms]
    print("| arm | steps | train s | PSNR | " + " | ".join(SCORED) + " | fit: calibration bits |")
    print("|---|---|---|---|" + "---|" * (len(SCORED) + 1))
    for row in rows:
        print(f"| {row['arm']} | {row['steps']} | {row['train_s']} | {row['psnr']:.2f} | "
              + " | ".join(f"{row[c]:.3f}" for c in SCORED) + f" | {row['fit_calibration_bit_acc']:.4f} |")


if __name__ == "__main__":
    exit_on_user_error(main)
