"""Recipe search for the embedded default: which training recipe reaches bit_acc >= 0.99 at
PSNR >= 30 dB fastest on 2 CPU cores? Prints a table; results go to experiments/results/.

    python experiments/recipe_search.py VARIANT [VARIANT ...] [--steps N] [--threads T]

Each variant is a set of Hydra overrides defined in VARIANTS below, applied on top of
`+experiment=train`. The base VAE comes from the same cache the main entry point uses.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate

from fingerprint_lm.lit import stages
from fingerprint_lm.storage import append_jsonl
from fingerprint_lm.tasks.compose import compose_config
from fingerprint_lm.tasks.train import model_spec, quiet_trainer_factory, train_from_config

ROOT = Path(__file__).resolve().parents[1]
VARIANTS: dict[str, list[str]] = {
    "carriers+affine_K1": [],
    "carriers+affine_K0": ["method.train.wc_steps=0"],
    "carriers_only_K1": ["method.pnm.affine_sites=[]"],
    "affine_only_K1": ["method.pnm.spatial_site=null", "method.detector_fit_samples=0"],
    "carriers+affine_K1_decoder": ["method.train.train_decoder=true"],
    "carriers+affine_K1_lr3e-4": ["method.train.lr=3e-4"],
    "carriers+affine_K1_cdrop0.5": ["method.train.carrier_dropout=0.5"],
    "carriers+affine_K1_cdrop0.5_decoder": ["method.train.carrier_dropout=0.5", "method.train.train_decoder=true",
                                            "method.train.decoder_lr=1e-4"],
    # Robustness to blur/JPEG after the base VAE got sharper (4000 pretraining steps): a lower
    # PSNR target (stronger carriers) vs blur and JPEG probes twice as often.
    "carriers+affine_K1_psnr29": ["method.train.psnr_target=29.0"],
    "carriers+affine_K1_blurjpeg0.6": ["method.augment.p_blur=0.6", "method.augment.p_jpeg=0.6"],
}


def compose_cfg(overrides: list[str]):
    # the carrier recipes it searched (the default method until 2026-12-06)
    return compose_config(["+experiment=train", "method=carrier", *overrides], ROOT / "outputs" / "recipe_search")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("variants", nargs="+", choices=sorted(VARIANTS))
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--eval-images", type=int, default=512)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.variants:
        cfg = compose_cfg([*VARIANTS[name], f"method.steps={args.steps}", "logger=none"])
        datamodule = instantiate(cfg.data)
        make_trainer = quiet_trainer_factory(cfg, enable_progress_bar=False, limit_val_batches=0)
        vae, _ = stages.prepare_base_vae(model_spec(cfg), cfg.paths.cache_dir, datamodule, make_trainer)
        start = time.perf_counter()
        model, _, facts = train_from_config(cfg, vae, datamodule, make_trainer)
        metrics = stages.evaluate_fingerprint(model, datamodule.test_dataloader(), args.eval_images)
        row = {"variant": name, "steps": facts["steps"], "seconds": round(time.perf_counter() - start, 1),
               "bit_acc": round(metrics["bit_acc"], 4), "psnr": round(metrics["psnr"], 2),
               "ssim": round(metrics["ssim"], 4),
               "no_carriers": round(metrics.get("bit_acc_carriers_removed", float("nan")), 4),
               **{k: round(v, 4) for k, v in metrics["robustness"].items()}}
        rows.append(row)
        print(json.dumps(row), flush=True)
        append_jsonl(ROOT / "experiments" / "results" / "recipe_search.jsonl",  # a row at a time: runs get killed
                     {"date": time.strftime("%Y-%m-%d %H:%M"), "threads": args.threads, **row})
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(str(row[k]) for k in keys) + " |")


if __name__ == "__main__":
    L.seed_everything(0, verbose=False)
    main()
