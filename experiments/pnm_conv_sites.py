"""Does WOUAF-style conv modulation beside the GroupNorms widen method=pnm's channel? (issue 11)

Issue 11 lists it among what might widen the channel: besides the affine of 17 decoder GroupNorms
(1536 values), the private mapping network also scales the input channels of decoder convs
(``method.pnm.conv_sites``; still stock weights: a scaled weight column is a stock conv). This
script runs the training command once per arm, alone and one after the other, with the recipe
the arms were measured against (``PREVIOUS``: conf/method/pnm.yaml before it took the combined arm)
shortened to ``--steps`` (its warm-down covers the last quarter as in the full run), and
prints the held-out figures the training task measures (512 images, a fresh code each):

    python experiments/pnm_conv_sites.py --steps 2000
    python experiments/pnm_conv_sites.py --steps 12000 --arms groupnorm+conv_decoder_lr_x2_bound_1.0 --keep runs/pnm12k

``--keep DIR`` keeps each arm's run folder and its exported copy (``DIR/<arm>/checkpoint``, the layout
``make checkpoint METHOD=pnm`` writes to ``fingerprint_lm/assets/embedded_pnm``).

Arms: ``groupnorm`` (the previous recipe's sites), ``groupnorm+conv`` (plus every decoder conv that
method=wouaf scales), ``groupnorm+conv_out`` (plus only the last conv, next to the pixels), and
two controls on the learning rates of the shipped sites, to set the conv arms' gains against a
cheaper knob: ``groupnorm_lr_x2`` (every rate doubled), ``groupnorm_decoder_lr_x2``,
``groupnorm_lr_x0.5`` (every rate halved); and ``groupnorm_bound_1.0``, the modulation bound
doubled (the previous checkpoint put 18% of its modulation values above 0.9 of the bound 0.5);
``groupnorm+conv_decoder_lr_x2_bound_1.0``, the three together: what conf/method/pnm.yaml ships
since 2026-12-04 (0.891 after 12000 steps against the previous recipe's 0.871).
Rows go to ``results/pnm_conv_sites.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fingerprint_lm.attacks.cases import ROBUSTNESS_SUITE
from fingerprint_lm.errors import ConfigError, check_int, exit_on_user_error
from fingerprint_lm.storage import append_jsonl

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "experiments" / "results" / "pnm_conv_sites.jsonl"
# method=wouaf's own sites, read from its composed config when an arm runs (wouaf_sites), so the
# two cannot drift apart
WOUAF_CONVS = "method.pnm.conv_sites=<method=wouaf's conv_sites>"
# The recipe the arms were measured against: conf/method/pnm.yaml before it took the combined arm
# (2026-12-04), stated here so that every arm still runs what the table reports.
PREVIOUS = ["method.pnm.conv_sites=[]", "method.pnm.modulation_bound=0.5", "method.train.decoder_lr=5e-4"]
ARMS = {
    "groupnorm": [*PREVIOUS],
    "groupnorm+conv": [*PREVIOUS, WOUAF_CONVS],
    "groupnorm+conv_out": [*PREVIOUS, "method.pnm.conv_sites=[conv_out]"],
    # the same sites at twice the learning rates (mapping network and reader; shared decoder)
    "groupnorm_lr_x2": [*PREVIOUS, "method.train.lr=2e-3", "method.train.decoder_lr=1e-3"],
    "groupnorm_decoder_lr_x2": [*PREVIOUS, "method.train.decoder_lr=1e-3"],
    "groupnorm_lr_x0.5": [*PREVIOUS, "method.train.lr=5e-4", "method.train.decoder_lr=2.5e-4"],
    # the previous checkpoint's mapping network sat near its bound: 18% of its values above 0.9 b
    "groupnorm_bound_1.0": [*PREVIOUS, "method.pnm.modulation_bound=1.0"],
    # the three small gains together: do they add? (what conf/method/pnm.yaml now ships)
    "groupnorm+conv_decoder_lr_x2_bound_1.0": [*PREVIOUS, WOUAF_CONVS,
                                               "method.train.decoder_lr=1e-3", "method.pnm.modulation_bound=1.0"],
}
# a few cases of the one robustness suite: the columns this probe's recorded results have
PROBES = ("shift_8", "crop_0.5", "jpeg_q50", "gaussian_blur_s1", "brightness_1.5")
assert set(PROBES) <= set(ROBUSTNESS_SUITE), set(PROBES) - set(ROBUSTNESS_SUITE)


def wouaf_sites() -> str:
    # imported here: the task package's import (diffusers, seconds) waits until an arm runs, after
    # the argument checks
    from fingerprint_lm.tasks.compose import method_config

    return "method.pnm.conv_sites=[" + ",".join(method_config("wouaf").pnm.conv_sites) + "]"


def run_arm(name: str, steps: int, out: Path, seed: int | None, export: bool = False) -> dict:
    overrides = [wouaf_sites() if override == WOUAF_CONVS else override for override in ARMS[name]]
    command = [sys.executable, "-m", "fingerprint_lm", "+experiment=train", "method=pnm", f"method.steps={steps}",
               "logger=none", f"hydra.run.dir={out}", *overrides, *([f"seed={seed}"] if seed is not None else []),
               # --keep: the trained copy is exported beside the run, never over the shipped assets
               *(["export_checkpoint=true", f"paths.export_dir={out / 'checkpoint'}"] if export else [])]
    print("$", " ".join(command), flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    metrics = json.loads((out / "metrics.json").read_text())
    return {"arm": name, "steps": steps, "seed": seed, "wall_seconds": round(time.perf_counter() - start, 1),
            "train_seconds": round(metrics["train_seconds"], 1), "bit_acc": metrics["bit_acc"],
            "psnr": metrics["psnr"], "ssim": metrics["ssim"],
            "robustness": {p: metrics["robustness"].get(p) for p in PROBES}, "overrides": overrides}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--arms", default=",".join(ARMS))
    parser.add_argument("--seed", type=int, default=None, help="the training command's seed (default: the config's)")
    parser.add_argument("--keep", type=Path, default=None,
                        help="keep each arm's run folder and exported checkpoint under DIR/<arm> "
                             "(default: a temporary folder)")
    args = parser.parse_args()
    arms = args.arms.split(",")
    unknown = set(arms) - set(ARMS)
    if unknown:
        raise ConfigError(f"--arms takes {', '.join(ARMS)}, got {args.arms!r}")
    check_int("--steps", args.steps)
    if args.keep is not None and args.keep.exists() and (not args.keep.is_dir() or any(args.keep.iterdir())):
        raise ConfigError(f"--keep {args.keep} is a file or a folder that is not empty; name a new folder")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in arms:
            out = (args.keep.resolve() if args.keep is not None else Path(tmp)) / name
            row = run_arm(name, args.steps, out, args.seed, export=args.keep is not None)
            rows.append(row)
            append_jsonl(RESULTS, row)
    print(f"| arm | steps | seed | train s | bit_acc | PSNR dB | SSIM | {' | '.join(PROBES)} |")
    print("|---" * (7 + len(PROBES)) + "|")
    for r in rows:
        attacks = " | ".join(f"{r['robustness'][p]:.3f}" if r["robustness"][p] is not None else "-" for p in PROBES)
        print(f"| {r['arm']} | {r['steps']} | {r['seed']} | {r['train_seconds']:.0f} | {r['bit_acc']:.3f} | "
              f"{r['psnr']:.2f} | "
              f"{r['ssim']:.3f} | {attacks} |")


if __name__ == "__main__":
    exit_on_user_error(main)
