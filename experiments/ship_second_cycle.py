"""Ship a second-cycle run of the pnm checkpoint as ``fingerprint_lm/assets/embedded_pnm``.

The shipped pnm recipe trains two cycles of the rates (``conf/method/pnm.yaml``: ``shipped_steps``,
then ``shipped_second_cycle``), and ``make checkpoint METHOD=pnm`` runs both in one command. The
checkpoint shipped on 2026-12-06 was made in two commands instead: the 16000-step run shipped on
2026-12-05, then its second cycle run on its own::

    python -m fingerprint_lm method=pnm init_from=shipped method.steps=2000 logger=none \\
        method.train.lr=1e-4 method.train.decoder_lr=1e-4 method.train.wc_rho_ramp=0

(``python experiments/pnm_augment_finetune.py --steps 2000 --variants none``). That run records
``init_from`` and its own 2000 steps; the one command records the first cycle's recipe and steps
with ``second_cycle`` beside them, which is what the collusion sweep matches. This script checks
that the run is exactly that second cycle of the shipped checkpoint (same method, PNM, reader,
code length, first-cycle recipe; its rates are the shipped first cycle's with pnm.yaml's
``shipped_second_cycle`` over them; it continued the shipped checkpoint's weights: same
``reference_vae``), then writes it with the one command's record and a ``made_by`` entry naming
the two commands, atomically::

    python experiments/ship_second_cycle.py <run>/fingerprint_model
"""

from __future__ import annotations

import argparse
from pathlib import Path

from omegaconf import OmegaConf

from fingerprint_lm.errors import ConfigError, exit_on_user_error
from fingerprint_lm.models.checkpoint import load_fingerprint_model, save_fingerprint_model, shipped_checkpoint
from fingerprint_lm.storage import file_sha256
from fingerprint_lm.tasks.compose import method_config

REFERENCE_WEIGHTS = "reference_vae/diffusion_pytorch_model.safetensors"  # the base decoder as it was


def shipped_meta(run_dir: Path, shipped_dir: Path, cycle: dict) -> dict:
    """The record ``make checkpoint METHOD=pnm`` writes for the run at ``run_dir``, after checking
    that it is ``cycle`` run from the checkpoint at ``shipped_dir``; ConfigError otherwise."""
    run, first = load_fingerprint_model(run_dir).meta, load_fingerprint_model(shipped_dir).meta
    if first["recipe"].get("second_cycle") is not None:
        raise ConfigError(f"{shipped_dir} already records a second cycle: it is not a first cycle's model")
    if run["recipe"].get("init_from") != "shipped":
        raise ConfigError(f"{run_dir} was not continued from the shipped checkpoint (init_from="
                          f"{run['recipe'].get('init_from')!r})")
    for key in ("method", "fingerprint_bits", "resolution", "pnm", "extractor"):
        if run.get(key) != first.get(key):
            raise ConfigError(f"{run_dir}: {key} differs from the shipped checkpoint's")
    rest = {k: v for k, v in run["recipe"].items() if k not in ("init_from", "train")}
    if rest != {k: v for k, v in first["recipe"].items() if k != "train"}:
        raise ConfigError(f"{run_dir}: its augment, reader fit or calibration settings differ from the shipped ones")
    wanted = {**first["recipe"]["train"], **cycle["train"]}
    if run["recipe"]["train"] != wanted or run["metrics"]["steps"] != cycle["steps"]:
        raise ConfigError(f"{run_dir}: not pnm.yaml's shipped_second_cycle ({cycle}) over the shipped rates")
    if file_sha256(run_dir / REFERENCE_WEIGHTS) != file_sha256(shipped_dir / REFERENCE_WEIGHTS):
        raise ConfigError(f"{run_dir}: its reference decoder is not the shipped checkpoint's")
    meta = dict(run)
    meta["recipe"] = {**first["recipe"], "second_cycle": cycle}
    meta["metrics"] = {**run["metrics"], "steps": first["metrics"]["steps"]}
    meta["made_by"] = [
        f"first cycle: the checkpoint shipped before ({first['metrics']['steps']} steps, "
        f"bit_acc {first['metrics']['bit_acc']:.4f}): python -m fingerprint_lm +experiment=train method=pnm",
        f"second cycle ({cycle['steps']} steps): python -m fingerprint_lm method=pnm init_from=shipped "
        f"method.steps={cycle['steps']} logger=none "
        + " ".join(f"method.train.{k}={v}" for k, v in cycle["train"].items()),
    ]
    return meta


def ship_arguments(doc: str, run_model_help: str) -> argparse.Namespace:
    """The command line of this script and ship_content_cycle.py: the run's saved model (refused
    when no checkpoint is there) and ``--out``."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_model", type=Path, help=run_model_help)
    parser.add_argument("--out", type=Path, default=None, help="default: the shipped embedded_pnm folder")
    args = parser.parse_args()
    if not (args.run_model / "fingerprint.json").is_file():
        raise ConfigError(f"{args.run_model}: no fingerprint checkpoint there (fingerprint.json missing)")
    return args


def main() -> None:
    args = ship_arguments(__doc__, "the second cycle's <run>/fingerprint_model")
    shipped = shipped_checkpoint("embedded_pnm")
    cycle = OmegaConf.to_container(method_config("pnm").shipped_second_cycle, resolve=True)
    cycle = cycle[0] if isinstance(cycle, list) else cycle  # the second cycle; later ones: ship_content_cycle.py
    meta = shipped_meta(args.run_model, shipped, cycle)
    model = load_fingerprint_model(args.run_model)
    model.meta = meta
    out = save_fingerprint_model(model, args.out or shipped)
    print(f"wrote {out}: bit_acc {meta['metrics']['bit_acc']:.4f}, PSNR {meta['metrics']['psnr']:.2f} dB")


if __name__ == "__main__":
    exit_on_user_error(main)
