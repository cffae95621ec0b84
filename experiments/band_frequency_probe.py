"""Probe (issue 11): do lower secret bands make pnm's mark survive JPEG and blur; do higher ones read better?

The shipped band reader's secret bands lie at 0.12-0.35 cycles per pixel
(``method.extractor.band_energy.frequency``). Blur at sigma 1 keeps exp(-2 pi^2 f^2) of a band's
amplitude (0.17 at 0.30, 0.64 at 0.15) and JPEG's 4:2:0 chroma subsampling removes chroma above
0.25 (``results/jpeg_chroma_probe.md``), and the attacked reads lose their class separation, not
their threshold (``results/read_threshold_probe.md``). Lower bands sit where content has more
energy, so the clean read may pay; higher ones (``high``: up to 0.45, near Nyquist) where it has
less. This trains pnm from scratch with the shipped first-cycle recipe
for ``--steps``, once per arm, each as

    python -m fingerprint_lm method=pnm method.steps=STEPS logger=none method.issue_screen=null \\
        eval.issue_predictor_codes=0 [method.extractor.band_energy.frequency=[LOW,HIGH]]

in its own folder under ``--workdir`` (base VAE from ``--cache``), one at a time, and reads each
run's held-out figures (``metrics.json``: the content reader fitted after training, as the
distributor reads). Rows go to ``results/band_frequency_probe.jsonl``; the table is printed:

    python experiments/band_frequency_probe.py --steps 2000
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from luma_reader_probe import probe_arguments
from pnm_augment_finetune import row_figures, train_in_fresh_folder

from fingerprint_lm.errors import exit_on_user_error
from fingerprint_lm.report.text_tables import markdown_lines
from fingerprint_lm.storage import append_jsonl

RESULTS = Path(__file__).resolve().parent / "results" / "band_frequency_probe.jsonl"
COMMON = ["logger=none", "method.issue_screen=null", "eval.issue_predictor_codes=0"]
ARMS = {"shipped": [], "low": ["method.extractor.band_energy.frequency=[0.07,0.22]"],
        "high": ["method.extractor.band_energy.frequency=[0.2,0.45]"]}
COLUMNS = ("bit_acc", "psnr", "shift_8", "jpeg_q90", "jpeg_q50", "gaussian_blur_s1", "gaussian_noise_0.05",
           "brightness_1.5", "combined")


def run_arm(name: str, steps: int, workdir: Path, cache: Path) -> dict:
    metrics_path, seconds = train_in_fresh_folder(
        workdir / name, ["method=pnm", f"method.steps={steps}", *COMMON, *ARMS[name]],
        env={**os.environ, "FINGERPRINT_LM_CACHE": str(cache)})
    return {"arm": name, "steps": steps, "overrides": ARMS[name], "seconds": round(seconds),
            **row_figures(json.loads(metrics_path.read_text()), COLUMNS), "date": time.strftime("%Y-%m-%d %H:%M")}


def main() -> None:
    args = probe_arguments(__doc__.splitlines()[0], list(ARMS), "band_frequency_probe")
    rows = []
    for name in args.arms:
        rows.append(run_arm(name, args.steps, args.workdir, args.cache))
        append_jsonl(RESULTS, rows[-1])
        columns = ("arm", "steps", "seconds", *COLUMNS)
        print("\n".join(markdown_lines(columns, rows, lambda v: f"{v:.3f}" if isinstance(v, float) else str(v))),
              flush=True)


if __name__ == "__main__":
    exit_on_user_error(main)
