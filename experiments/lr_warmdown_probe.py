"""Does a learning-rate warm-down lift method=pnm's mark? (issue 11)

The shipped pnm recipe trains at constant learning rates, and its training curve still rises at
12000 steps (about +0.005 bit accuracy per 500 steps). A linear decay of every rate to 0 over a
run's last steps (``method.train.lr_warmdown_fraction``) often consolidates what a constant rate leaves
noisy. This probe warm-starts from a shipped checkpoint (mapping network, trained shared decoder,
learned reader) and continues the shipped recipe for ``--steps`` more steps, once per schedule:
``constant`` (the control: what more steps alone give) and ``warmdown`` (the rates fall linearly
to 0 over those steps). Each result is then whitened on 2048 unmarked images and evaluated as the
training task evaluates (512 held-out images, a fresh code per image, the robustness suite).

    python experiments/lr_warmdown_probe.py --steps 1500

The optimizer state and the PSNR steering's weight are not in a checkpoint: both restart (the
weight from the recipe's ``rec_weight_init``), so both arms first share ``--warmup`` steps at
constant rates (same seed: the same steps) in which the PSNR returns to its target. Rows are appended to
``results/lr_warmdown_probe.jsonl``; a table is printed.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import lightning as L
import torch

from fingerprint_lm.attacks.cases import ROBUSTNESS_SUITE
from fingerprint_lm.data.datamodule import ImageDataModule
from fingerprint_lm.errors import ConfigError, check_int, exit_on_user_error
from fingerprint_lm.lit.fingerprinting import FingerprintModule
from fingerprint_lm.lit.stages import evaluate_fingerprint
from fingerprint_lm.methods.base import collect_images
from fingerprint_lm.methods.pnm import unmarked_outputs, whiten
from fingerprint_lm.models import batched
from fingerprint_lm.models.augment import AugmentConfig
from fingerprint_lm.models.checkpoint import load_fingerprint_model, shipped_checkpoint
from fingerprint_lm.storage import append_jsonl

RESULTS = Path(__file__).resolve().parent / "results" / "lr_warmdown_probe.jsonl"
# a few cases of the one robustness suite: the columns this probe's recorded results have
PROBES = ("shift_8", "crop_0.5", "crop_resize_0.5", "jpeg_q50", "gaussian_blur_s1", "brightness_1.5")
assert set(PROBES) <= set(ROBUSTNESS_SUITE), set(PROBES) - set(ROBUSTNESS_SUITE)


def continue_training(checkpoint: str, schedule: str, steps: int, warmup: int, seed: int,
                      freeze_reader: bool = False, reader_warmdown: bool = False, augment: float = 0.0,
                      prepare=None, measure=None) -> dict:
    """Continue ``checkpoint``'s recipe (see the module docstring); the row of figures. Other probes
    change the module before training with ``prepare(module)`` and add figures of the trained model
    to the row with ``measure(model) -> dict``."""
    model = load_fingerprint_model(shipped_checkpoint(checkpoint))
    recipe = model.meta.get("recipe")
    if model.method != "pnm" or recipe is None or model.reference_vae is None:
        raise ConfigError(f"{checkpoint}: a pnm checkpoint with a recorded recipe and reference_vae/ is needed")
    # training continues from the reader as trained: the per-bit calibration is fitted after training
    # (2026-12-06), and these probes' results were measured before it existed
    model.extractor.bit_scale.fill_(1.0)
    # a frozen reader keeps the checkpoint's whitening valid: training aims at the final logits
    model.extractor.train().requires_grad_(not freeze_reader)
    L.seed_everything(seed, verbose=False)
    # --freeze-reader: frozen here for the whole continuation; --reader-warmdown: the recipe's own
    # warm-down freezes it (re-whitened first) once the warm-up steps are done
    train = {**recipe["train"], "lr_warmdown_fraction": steps / (warmup + steps) if schedule == "warmdown" else 0.0,
             "warmdown_reader": "frozen" if reader_warmdown else "trained"}
    # --augment P: every training augmentation (crop+resize, brightness, blur, noise, JPEG-like) drawn
    # with probability P per batch, at the recipe's strength ranges
    probabilities = ({f"p_{name}": augment for name in ("crop", "brightness", "blur", "noise", "jpeg")}
                     if augment else {})
    module = FingerprintModule(model.vae, model.pnm, model.extractor,
                               augment=AugmentConfig(**{**recipe["augment"], **probabilities}), **train)
    # the reference is the decoder as it was before any training, not the trained shared one
    module.reference_pnm.decoder.load_state_dict(model.reference_vae.decoder.state_dict())
    module.reference_pnm.post_quant_conv.load_state_dict(model.reference_vae.post_quant_conv.state_dict())
    module.detector_fitted.fill_(True)
    data = ImageDataModule(source="synthetic", resolution=32, batch_size=32, seed=seed, test_size=512)
    data.setup("fit")
    if reader_warmdown:  # what PNMMethod.prepare_training holds for the warm-down's re-whitening
        module.whitening_outputs = unmarked_outputs(
            module, collect_images(data.train_dataloader(), recipe.get("detector_fit_samples", 2048)))
    if prepare is not None:
        prepare(module)
    trainer = L.Trainer(accelerator="cpu", max_steps=warmup + steps, logger=False, enable_checkpointing=False,
                        limit_val_batches=0, enable_progress_bar=True, enable_model_summary=False)
    start = time.perf_counter()
    trainer.fit(module, train_dataloaders=data.train_dataloader())
    seconds = time.perf_counter() - start
    model.pnm.eval()
    model.extractor.eval()
    eval_data = ImageDataModule(source="synthetic", resolution=32, batch_size=32, seed=0, test_size=512)
    eval_data.setup("test")
    # read with the whitening training aimed at, then with the one fitted afresh (what ships)
    as_trained = evaluate_fingerprint(model, eval_data.test_dataloader(), 512, probes=())["bit_acc"]
    stale = whiteness(model.extractor, unmarked_outputs(module, collect_images(data.train_dataloader(), 2048)))
    whiten(module, collect_images(data.train_dataloader(), recipe.get("detector_fit_samples", 2048)))
    metrics = evaluate_fingerprint(model, eval_data.test_dataloader(), 512, probes=PROBES)
    tail = module.history[-min(500, len(module.history)):]
    return {"date": time.strftime("%Y-%m-%d"), "checkpoint": checkpoint, "schedule": schedule, "steps": steps,
            "warmup": warmup, "seed": seed, "freeze_reader": freeze_reader,
            "reader_warmdown": reader_warmdown, "augment": augment, "bit_acc_before_rewhitening": as_trained,
            "train_seconds": round(seconds, 1),
            "train_bit_acc_last500": sum(r["bit_acc"] for r in tail) / max(1, len(tail)),
            "bit_acc": metrics["bit_acc"], "psnr": metrics["psnr"], "ssim": metrics["ssim"],
            "robustness": metrics["robustness"], **stale, **(measure(model) if measure is not None else {})}


@torch.no_grad()
def whiteness(reader, unmarked: torch.Tensor) -> dict[str, float]:
    """How white the training's whitening still is on unmarked outputs: the fraction of 1-bits and
    the largest correlation between two logits."""
    logits = batched.extract(reader, unmarked, batch_size=256)
    correlation = torch.corrcoef(logits.T) - torch.eye(logits.shape[1])
    return {"stale_one_bits": (logits > 0).float().mean().item(), "stale_max_corr": correlation.abs().max().item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="embedded_pnm")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--schedules", default="constant,warmdown")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--freeze-reader", action="store_true", help="train the mapping and decoder only")
    parser.add_argument("--reader-warmdown", action="store_true",
                        help="the recipe's warm-down: the reader trains in the warm-up, then is re-whitened and frozen")
    parser.add_argument("--augment", type=float, default=0.0, help="probability of each training augmentation")
    args = parser.parse_args()
    check_int("--steps", args.steps)
    check_int("--warmup", args.warmup, 0)
    if not 0.0 <= args.augment <= 1.0:
        raise ConfigError(f"--augment is a probability in [0, 1], got {args.augment}")
    if args.freeze_reader and args.reader_warmdown:
        raise ConfigError("--freeze-reader and --reader-warmdown exclude each other")
    schedules = args.schedules.split(",")
    if set(schedules) - {"constant", "warmdown"}:
        raise ConfigError(f"--schedules takes constant and/or warmdown, got {args.schedules!r}")
    rows = []
    for schedule in schedules:
        row = continue_training(args.checkpoint, schedule, args.steps, args.warmup, args.seed, args.freeze_reader,
                                args.reader_warmdown, args.augment)
        rows.append(row)
        append_jsonl(RESULTS, row)
    print(f"{args.warmup} shared steps at constant rates first, then:")
    print("| schedule | reader | augment | +steps | s | train acc (last 500) | before re-whitening | bit_acc | PSNR | "
          f"{' | '.join(PROBES)} |")
    print("|---" * (9 + len(PROBES)) + "|")
    for r in rows:
        attacks = " | ".join(f"{r['robustness'][p]:.3f}" for p in PROBES)
        reader = "frozen" if r["freeze_reader"] else "frozen at warm-down" if r.get("reader_warmdown") else "trained"
        print(f"| {r['schedule']} | {reader} | {r.get('augment', 0.0):g} | {r['steps']} | {r['train_seconds']:.0f} | "
              f"{r['train_bit_acc_last500']:.3f} | "
              f"{r['bit_acc_before_rewhitening']:.3f} | "
              f"{r['bit_acc']:.3f} | {r['psnr']:.2f} | {attacks} |")


if __name__ == "__main__":
    exit_on_user_error(main)
