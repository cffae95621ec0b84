"""Probe (issue 11): does a band reader along luma make pnm's mark survive JPEG?

The shipped reader's bands each lie along a random colour direction, and the mark it taught the
decoder lives mostly in chroma, which JPEG's 4:2:0 subsampling removes
(``results/jpeg_chroma_probe.md``). This trains pnm from scratch with the shipped recipe for
``--steps`` twice, the bands' colours random (as shipped) and along luma (same secret frequencies
and orientations), each as

    python -m fingerprint_lm method=pnm method.steps=STEPS logger=none [+method.extractor.band_energy.colour=luma]

in its own folder under ``--workdir`` (the base VAE from ``--cache``, default the checkout's
``.cache/fingerprint_lm``), one at a time, and reads each model's held-out figures
(``metrics.json``) and its colour probe (``jpeg_chroma_probe.probe``). Rows go to
``results/luma_reader_probe.jsonl``; the table is printed and written to ``results/luma_reader_probe.md``:

    python experiments/luma_reader_probe.py --steps 2000
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from jpeg_chroma_probe import probe
from pnm_augment_finetune import row_figures, train_in_fresh_folder

from fingerprint_lm.errors import check_int, exit_on_user_error
from fingerprint_lm.storage import append_jsonl

RESULTS = Path(__file__).resolve().parent / "results"
# the base VAE every shipped checkpoint shares, cached by the checkout's own runs (a cold one pretrains ~10 min)
CHECKOUT_CACHE = Path(__file__).resolve().parent.parent / ".cache" / "fingerprint_lm"
ARMS = {"random": [], "luma": ["+method.extractor.band_energy.colour=luma"]}
COLUMNS = ("bit_acc", "psnr", "shift_8", "jpeg_q90", "jpeg_q50", "gaussian_blur_s1", "brightness_1.5")


def run_arm(name: str, steps: int, workdir: Path, cache: Path) -> dict:
    metrics_path, seconds = train_in_fresh_folder(
        workdir / name, ["method=pnm", f"method.steps={steps}", "logger=none", *ARMS[name]],
        env={**os.environ, "FINGERPRINT_LM_CACHE": str(cache)})
    figures = row_figures(json.loads(metrics_path.read_text()), COLUMNS)
    colours = probe(str(metrics_path.parent / "fingerprint_model"), users=4, n_images=256, seed=5)
    return {"arm": name, "steps": steps, "overrides": ARMS[name], "seconds": round(seconds, 1), **figures,
            "colour_probe": colours}


def probe_arguments(description: str, arms: list[str], workdir: str) -> argparse.Namespace:
    """The command line of a probe that trains pnm from scratch once per arm (this one,
    band_frequency_probe.py): ``--steps``, ``--arms``, ``--workdir``, ``--cache``; steps checked."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--arms", nargs="+", default=arms, choices=arms)
    parser.add_argument("--workdir", type=Path, default=Path(workdir))
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get("FINGERPRINT_LM_CACHE", CHECKOUT_CACHE)))
    args = parser.parse_args()
    check_int("--steps", args.steps)
    return args


def main() -> None:
    args = probe_arguments(__doc__.splitlines()[0], list(ARMS), "luma_reader_probe")
    lines = ["| arm | steps | s | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 3) + "|"]
    probes = []
    for name in args.arms:
        row = run_arm(name, args.steps, args.workdir, args.cache)
        append_jsonl((RESULTS / "luma_reader_probe.jsonl"), row)
        lines.append(f"| {name} | {row['steps']} | {row['seconds']:.0f} | "
                     + " | ".join(f"{row[key]:.2f}" if key == "psnr" else f"{row[key]:.3f}" for key in COLUMNS) + " |")
        probes.append(f"### {name}\n\n{row['colour_probe']}")
        print("\n".join(lines), flush=True)
    (RESULTS / "luma_reader_probe.md").write_text("\n".join(lines) + "\n\n" + "\n\n".join(probes) + "\n")


if __name__ == "__main__":
    exit_on_user_error(main)
