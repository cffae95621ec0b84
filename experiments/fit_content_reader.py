"""Fit pnm's content-dividing reader into a saved checkpoint (issue 11).

Training now fits it after its last step (``method.content_reader`` in ``conf/method/pnm.yaml``;
``fingerprint_lm/methods/content_reader.py: fit_content_reader``), and the distributor reads found
images with it (``FingerprintModel.reader``). A pnm checkpoint written before 2026-12-07 has none;
this runs the same fit with pnm.yaml's settings on the procedural training stream (``--seed``: the
training config's) and rewrites only ``fingerprint.safetensors`` (the reader's tensors join it; the
rest keep their values), ``fingerprint.json`` (the fit's figures as ``content_reader``, its settings
in ``recipe``, so that the collusion sweep still takes the checkpoint for pnm.yaml's, and a
``made_by`` line) and ``SHA256SUMS``. The shipped pnm checkpoint got its reader this way:

    python experiments/fit_content_reader.py fingerprint_lm/assets/embedded_pnm

A checkpoint that already has one is refused (``--refit`` replaces it). The code screen's floors and
read predictor were fitted to the reader before: refit them after it (``fit_issue_screen.py --refit``,
then ``--rate-only`` and ``--predictor``)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from omegaconf import OmegaConf

from fingerprint_lm.distributor.generation import training_images
from fingerprint_lm.errors import ConfigError, check_int, exit_on_user_error
from fingerprint_lm.methods.content_reader import check_content_reader_settings, fit_content_reader, fit_settings
from fingerprint_lm.models.checkpoint import load_fingerprint_model, rewrite_private_state
from fingerprint_lm.tasks.compose import method_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--refit", action="store_true", help="replace the content reader the checkpoint has")
    parser.add_argument("--seed", type=int, default=0, help="the procedural training stream's seed")
    args = parser.parse_args()
    check_int("--seed", args.seed, 0)
    model = load_fingerprint_model(args.checkpoint)
    if model.method != "pnm":
        raise ConfigError(f"{args.checkpoint} is a method={model.method} checkpoint; the content reader is pnm's")
    if model.content_reader is not None and not args.refit:
        raise ConfigError(f"{args.checkpoint} has a content reader already (--refit replaces it)")
    settings = OmegaConf.to_container(method_config("pnm").content_reader)
    settings = check_content_reader_settings(settings, model.fingerprint_bits)
    started = time.time()
    total = settings["unmarked_images"] + settings["train_images"] + settings["calibration_images"]
    images = training_images(int(model.meta.get("resolution", 32)), total, args.seed)
    figures = fit_content_reader(model, images.split(256), **fit_settings(settings))
    model.meta["content_reader"] = figures
    model.meta.setdefault("recipe", {})["content_reader"] = settings
    model.meta.setdefault("made_by", []).append(
        f"content_reader: python experiments/fit_content_reader.py {args.checkpoint}"
        f"{' --refit' if args.refit else ''} (pnm.yaml's settings, training stream seed {args.seed}, "
        f"{time.strftime('%Y-%m-%d')})")
    rewrite_private_state(model, args.checkpoint)
    print(f"{args.checkpoint}: content reader {figures} ({time.time() - started:.0f} s)")


if __name__ == "__main__":
    exit_on_user_error(main)
