"""How the pnm reader's whitening is kept during training (issue 11): prints one row per training
run, from each run's ``metrics.json`` and ``training_curve.csv``.

The runs are the README's training command with overrides, 2000 steps, the worst-case term off
(to isolate the reader from it), alone on the machine, e.g.:

    python -m fingerprint_lm +experiment=train method=pnm logger=csv method.shipped_steps=2000 \\
        method.train.wc_steps=0 method.train.rewhiten_every=0 hydra.run.dir=<dir>

    python experiments/whitening_table.py <label>=<dir> [...] [--refits]

A run may have been stopped early: it then has a curve but no held-out figures. Columns: mean
training bit accuracy per 500 steps (the batches the step trained on), then held-out bit accuracy
and PSNR (512 images, fresh codes, the whitening re-fitted after training).

``--refits`` also reads each finished run's trained model with other whitenings fitted on 2048
unmarked outputs of the decoder as it was (full or per-logit, median or mean centre) and with the
whitening the last training step used (``checkpoints/last.ckpt``): bit accuracy on 512 held-out
images, the share of 1-bits and the largest correlation between two logits on unmarked images.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from pathlib import Path

import torch

from fingerprint_lm.distributor.generation import held_out_images
from fingerprint_lm.errors import DataError, exit_on_user_error
from fingerprint_lm.models.checkpoint import load_fingerprint_model


def row(label: str, run: Path) -> list[str]:
    with open(run / "training_curve.csv" if (run / "training_curve.csv").exists()
              else run / "csv" / "version_0" / "metrics.csv") as handle:
        curve = [r for r in csv.DictReader(handle) if r.get("bit_acc") or r.get("train/bit_acc")]
    cells = [label]
    for start in range(0, 2000, 500):
        window = [float(r.get("bit_acc") or r["train/bit_acc"]) for r in curve if start <= int(r["step"]) < start + 500]
        cells.append(f"{statistics.mean(window):.3f}" if len(window) > 10 else "-")
    metrics = run / "metrics.json"
    if metrics.exists():
        data = json.loads(metrics.read_text())
        cells += [f"{data['bit_acc']:.4f}", f"{data['psnr']:.2f}", f"{data['train_seconds']:.0f}"]
    else:
        cells += ["- (stopped)", "-", "-"]
    return cells


@torch.no_grad()
def refit_rows(label: str, run: Path) -> list[str]:
    model = load_fingerprint_model(run / "fingerprint_model")
    reader = model.extractor
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")["state_dict"]
    codes = torch.randint(0, 2, (512, reader.fingerprint_bits), generator=torch.Generator().manual_seed(0))
    latents = model.vae.encode(held_out_images(32, 512, seed=77)).latent_dist.mode()
    marked, unmarked = model.pnm(latents, codes), model.unmarked_vae.decode(latents).sample
    fit = model.unmarked_vae.decode(model.vae.encode(held_out_images(32, 2048, seed=123)).latent_dist.mode()).sample
    raw_fit = reader.raw_logits(fit)
    whitenings = {}
    for decorrelate in (True, False):
        for centre in ("median", "mean"):
            reader.centre, reader.decorrelate = centre, decorrelate
            reader.fit_whitening_raw(raw_fit)
            name = f"{'full' if decorrelate else 'per-logit'}, {centre} centre"
            whitenings[name] = (reader.whiten_mean.clone(), reader.whiten_matrix.clone())
    whitenings["the last training step's"] = (state["extractor.whiten_mean"], state["extractor.whiten_matrix"])
    rows = []
    for name, (centre, matrix) in whitenings.items():
        reader.whiten_mean.copy_(centre)
        reader.whiten_matrix.copy_(matrix)
        bit_acc = ((reader(marked) > 0).long() == codes).float().mean().item()
        logits = reader(unmarked)
        correlation = (torch.corrcoef(logits.T) - torch.eye(len(codes.T))).abs().max().item()
        rows.append([label, name, f"{bit_acc:.4f}", f"{(logits > 0).float().mean().item():.3f}", f"{correlation:.3f}"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="LABEL=DIR", help="a training run's folder, named")
    parser.add_argument("--refits", action="store_true", help="also read each finished run with other whitenings")
    args = parser.parse_args()
    refits, arguments = args.refits, args.runs
    for argument in arguments:
        label, _, path = argument.partition("=")
        if not label or not path or not ((Path(path) / "training_curve.csv").is_file()
                                         or (Path(path) / "csv" / "version_0" / "metrics.csv").is_file()):
            raise DataError(f"{argument}: give LABEL=DIR, DIR a training run with training_curve.csv "
                            "or csv/version_0/metrics.csv")
    header = ["run", "train acc 0-499", "500-999", "1000-1499", "1500-1999", "held-out bit_acc", "PSNR", "train s"]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for argument in arguments:
        label, _, path = argument.partition("=")
        print("| " + " | ".join(row(label, Path(path))) + " |")
    if refits:
        header = ["run", "whitening read with", "held-out bit_acc", "unmarked 1-bits", "max |corr| unmarked"]
        print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
        for argument in arguments:
            label, _, path = argument.partition("=")
            if (Path(path) / "fingerprint_model").is_dir():
                for cells in refit_rows(label.split(":")[0], Path(path)):
                    print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    exit_on_user_error(main)
