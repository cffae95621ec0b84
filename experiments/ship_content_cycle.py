"""Ship a content-read cycle of the pnm checkpoint as ``fingerprint_lm/assets/embedded_pnm`` (issue 11).

Since 2026-12-07 pnm's shipped recipe trains two later cycles after its first 16000 steps
(``conf/method/pnm.yaml``: ``shipped_second_cycle``, a list): 2000 steps read by the band reader,
then 3000 whose loss reads the content reader fitted to that model (``read_with:
content_reader``); ``make checkpoint METHOD=pnm`` runs all three in one command. The checkpoint
shipped that day was made from the one shipped before (first and second cycle) by

    python experiments/content_reader_training.py --steps 3000 --arms content --keep <dir>

which trained the third cycle's rates with the loss read by that checkpoint's content reader, then
refitted the reader. The one command differs in two details: the images the cycle trains on (the
run's stream, here the procedural stream of seed 1) and the reader the cycle reads (fitted to the
model at the cycle's start; here the one shipped with it, whose fit drew its attacks in runs of a
batch instead of turn by turn: ``methods/content_reader.py``).

This checks that ``<dir>/content`` is that model (pnm, the shipped code length, PNM, reader and
reference decoder, made by that command with the cycle's steps and the recipe's rates),
re-evaluates it on the training run's held-out images as training does
(``lit/stages.py: evaluate_fingerprint``), writes the record the one command writes
(``recipe.second_cycle``: pnm.yaml's list) and leaves the code screen out: it was fitted to the
reader before, so fit it again (``fit_issue_screen.py <out>``, then ``--rate-only`` and
``--predictor``). Written atomically::

    python experiments/ship_content_cycle.py <dir>/content
"""

from __future__ import annotations

import re
from pathlib import Path

from omegaconf import OmegaConf
from ship_second_cycle import REFERENCE_WEIGHTS, ship_arguments

from fingerprint_lm.distributor.generation import held_out_images
from fingerprint_lm.errors import ConfigError, exit_on_user_error
from fingerprint_lm.lit.stages import evaluate_fingerprint
from fingerprint_lm.models.checkpoint import load_fingerprint_model, save_fingerprint_model, shipped_checkpoint
from fingerprint_lm.storage import file_sha256
from fingerprint_lm.tasks.compose import compose_config


def check_content_cycle(run: dict, shipped: dict, run_dir: Path, shipped_dir: Path, cycles: list) -> None:
    """ConfigError unless ``run_dir`` (its record ``run``) is the shipped model (``shipped``)
    continued by the last of ``cycles``."""
    if not isinstance(cycles, list) or len(cycles) != 2 or cycles[1].get("read_with") != "content_reader":
        raise ConfigError("pnm.yaml's shipped_second_cycle is not [a band-read cycle, a content-read cycle]")
    if shipped["recipe"].get("second_cycle") != cycles[0]:
        raise ConfigError(f"{shipped_dir} is not the first and second cycle of pnm.yaml's recipe")
    for key in ("method", "fingerprint_bits", "resolution", "pnm", "extractor", "recipe"):
        if run.get(key) != shipped.get(key):
            raise ConfigError(f"{run_dir}: {key} differs from the shipped checkpoint's")
    made = re.search(r"content_reader_training\.py --steps (\d+) --arms content ", (run.get("made_by") or [""])[-1])
    if made is None or int(made.group(1)) != cycles[1]["steps"]:
        raise ConfigError(f"{run_dir}: not made by content_reader_training.py --steps {cycles[1]['steps']} "
                          "--arms content (its last made_by line)")
    if cycles[1].get("train") != cycles[0].get("train"):  # the script trains the second cycle's rates
        raise ConfigError("pnm.yaml's content-read cycle has other rates than the script trained with")
    if file_sha256(run_dir / REFERENCE_WEIGHTS) != file_sha256(shipped_dir / REFERENCE_WEIGHTS):
        raise ConfigError(f"{run_dir}: its reference decoder is not the shipped checkpoint's")


def main() -> None:
    args = ship_arguments(__doc__, "content_reader_training.py's <keep>/content")
    shipped = shipped_checkpoint("embedded_pnm")
    config = compose_config(["+experiment=train"])  # as make checkpoint trains and evaluates
    cycles = OmegaConf.to_container(config.method.shipped_second_cycle, resolve=True)
    held_out = int(config.eval.max_images)  # what training evaluates on
    model = load_fingerprint_model(args.run_model)
    first = load_fingerprint_model(shipped).meta  # loaded, so its checksums are checked too
    check_content_cycle(model.meta, first, args.run_model, shipped, cycles)
    batches = [{"image": chunk} for chunk in held_out_images(int(model.meta["resolution"]), held_out).split(64)]
    figures = evaluate_fingerprint(model, batches, held_out)
    model.meta["recipe"] = {**first["recipe"], "second_cycle": cycles}
    model.meta["metrics"] = {**{k: figures[k] for k in ("bit_acc", "psnr", "ssim")}, "steps": first["metrics"]["steps"]}
    model.meta.pop("issue_screen", None)
    model.meta["made_by"] = [*first.get("made_by", []), model.meta["made_by"][-1],
                             f"then: python experiments/ship_content_cycle.py {args.run_model}"]
    out = save_fingerprint_model(model, args.out or shipped)
    print(f"wrote {out}: bit_acc {figures['bit_acc']:.4f}, PSNR {figures['psnr']:.2f} dB "
          f"({held_out} held-out images); fit its code screen next (fit_issue_screen.py)")


if __name__ == "__main__":
    exit_on_user_error(main)
