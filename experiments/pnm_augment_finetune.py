"""Fine-tune the shipped pnm model under image augmentations (issue 11's optional stage 3): does
training against JPEG, blur, noise and brightness buy robustness to them, and at what cost in
clean bit accuracy and PSNR? Each variant is one run of the train task from the shipped checkpoint,

    python -m fingerprint_lm method=pnm init_from=shipped method.steps=STEPS logger=none <variant>

with the same steps, rates and warm-down, so the control (no augmentation) separates what the
augmentations do from what the extra steps do. Each run writes into its own folder under
``--workdir``; its ``metrics.json`` (512 held-out images, the robustness suite) becomes a row of
``results/pnm_augment_finetune.jsonl``, and the table is printed and written to
``results/pnm_augment_finetune.md``:

    python experiments/pnm_augment_finetune.py --steps 2000 --variants none photometric

``--init-from <fingerprint_model folder>`` continues another run's model instead (a second cycle);
``--table-only`` rewrites the table from the rows already in the jsonl.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from fingerprint_lm.errors import ConfigError, check_int, exit_on_user_error
from fingerprint_lm.storage import append_jsonl

RESULTS = Path(__file__).resolve().parent / "results"
SHIPPED_METRICS = RESULTS / "embedded_pnm_train_metrics.json"
# Every run: fine-tune rates (the shipped run's 1e-3 costs 6 dB in its first 20 steps, as its
# Adam moments and reconstruction weight start afresh), the radius of the worst-case term at once
# (the model already carries the mark), and the shipped warm-down over the last quarter.
COMMON = ["method.train.lr=1e-4", "method.train.decoder_lr=1e-4", "method.train.wc_rho_ramp=0"]
VARIANTS = {
    "none": [],
    # JPEG in half the batches (straight-through DCT quantisation), the others in a quarter each
    "photometric": ["method.augment.p_jpeg=0.5", "method.augment.p_blur=0.25", "method.augment.p_noise=0.25",
                    "method.augment.p_brightness=0.25"],
    "jpeg": ["method.augment.p_jpeg=0.7"],
    # JPEG as encoders do it (YCbCr, 4:2:0 chroma): the default stand-in keeps chroma at full
    # resolution, where this mark mostly lives (results/jpeg_chroma_probe.md)
    "jpeg420": ["method.augment.p_jpeg=0.5", "+method.augment.jpeg_chroma_subsampling=true"],
}
COLUMNS = ("bit_acc", "psnr", "shift_8", "crop_0.5", "jpeg_q90", "jpeg_q50", "gaussian_blur_s1",
           "gaussian_noise_0.05", "brightness_1.5", "combined")


def train_in_fresh_folder(folder: Path, overrides: list[str], env: dict | None = None) -> tuple[Path, float]:
    """``python -m fingerprint_lm *overrides`` run from ``folder``, which must not exist yet: the run's
    ``metrics.json`` and the command's wall time in seconds (luma_reader_probe.py runs its arms so too)."""
    if folder.exists():
        raise ConfigError(f"{folder} exists: give another --workdir (each run trains in a fresh folder)")
    folder.mkdir(parents=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "fingerprint_lm", *overrides], cwd=folder, check=True, env=env)
    [metrics_path] = folder.glob("outputs/runs/*/metrics.json")
    return metrics_path, time.perf_counter() - start


def run_variant(name: str, steps: int, workdir: Path, init_from: str = "shipped") -> dict:
    metrics_path, seconds = train_in_fresh_folder(workdir / name, [
        "method=pnm", f"init_from={init_from}", f"method.steps={steps}", "logger=none", *COMMON, *VARIANTS[name]])
    return {"variant": name, "steps": steps, "init_from": init_from, "overrides": [*COMMON, *VARIANTS[name]],
            "seconds": round(seconds, 1), **row_figures(json.loads(metrics_path.read_text()))}


def row_figures(metrics: dict, columns: tuple[str, ...] = COLUMNS) -> dict:
    """``columns`` of a run's ``metrics.json``: top-level figures, else robustness probes."""
    robust = metrics.get("robustness", {})
    return {key: round(float(metrics[key] if key in metrics else robust[key]), 4) for key in columns}


def table(rows: list[dict]) -> str:
    lines = ["| variant | steps | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 2) + "|"]
    for row in rows:
        figures = " | ".join(f"{row[key]:.3f}" if key != "psnr" else f"{row[key]:.2f}" for key in COLUMNS)
        start = row.get("init_from", "shipped")
        variant = row["variant"] if start == "shipped" else f"{row['variant']}, a second cycle"
        lines.append(f"| {variant} | {row['steps']} | {figures} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--variants", nargs="+", default=["none", "photometric"], choices=sorted(VARIANTS))
    parser.add_argument("--workdir", type=Path, default=Path("pnm_augment_finetune"))
    parser.add_argument("--init-from", default="shipped")
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args()
    check_int("--steps", args.steps)
    if args.init_from != "shipped" and not (Path(args.init_from) / "fingerprint.json").is_file():
        raise ConfigError(f"--init-from {args.init_from}: no fingerprint checkpoint there (fingerprint.json missing)")
    shipped = {"variant": "shipped (16000 steps, no fine-tune)", "steps": 0,
               **row_figures(json.loads(SHIPPED_METRICS.read_text()))}
    rows = [shipped]
    if args.table_only:
        rows += [json.loads(line) for line in (RESULTS / "pnm_augment_finetune.jsonl").read_text().splitlines()]
        args.variants = []
    for name in args.variants:
        row = run_variant(name, args.steps, args.workdir, args.init_from)
        append_jsonl((RESULTS / "pnm_augment_finetune.jsonl"), row)
        rows.append(row)
        print(table(rows), flush=True)
    if args.table_only:
        print(table(rows))
    (RESULTS / "pnm_augment_finetune.md").write_text(table(rows) + "\n")


if __name__ == "__main__":
    exit_on_user_error(main)
