"""One table of every stock-weight recipe probe (issue 11): bit accuracy and PSNR vs training steps
and wall time, on held-out images, plus the shift and crop columns a probe measured.

    python experiments/stock_recipe_table.py > experiments/results/stock_recipe_table.md

Reads ``results/{stock_recipe_probe,closed_form_reader_probe,extractor_pretrain_probe,
band_energy_probe}.jsonl`` (one row per probe run; the probes' docstrings say what each does).
All rows: the shipped tiny VAE, 32 px procedural images, 2 CPU cores, batch 32.
"""

from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def describe(probe: str, row: dict) -> str:
    if probe == "stock_recipe_probe":
        decoder = f", decoder lr {row['decoder_lr']:g}" if row.get("decoder_lr") else ""
        return f"learned pooled reader ({row['variant']}), message-only warm-up, bound {row['bound']}{decoder}"
    if probe == "closed_form_reader_probe":
        return f"fixed random-feature reader, ridge-refit head ({row['input']})"
    if probe == "extractor_pretrain_probe":
        return "stage 1: reader + throwaway image encoder (Stable Signature split)"
    decoder = f", decoder lr {row['decoder_lr']:g}" if row.get("decoder_lr") else ", decoder frozen"
    differential = " differential" if row.get("differential") else ""
    if row.get("reader_lr"):
        return f"band-energy reader{differential} warm-started, filters learned (lr {row['reader_lr']:g}){decoder}"
    return f"fixed band-energy reader{differential}{decoder}"


def main() -> None:
    print("| recipe | bits | steps | PSNR target | wall s | bit_acc | PSNR dB | shift 3 px | crop 50% |")
    print("|---|---|---|---|---|---|---|---|---|")
    for probe in ("stock_recipe_probe", "closed_form_reader_probe", "extractor_pretrain_probe", "band_energy_probe"):
        path = RESULTS / f"{probe}.jsonl"
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            row = json.loads(line)
            crop = row.get("bit_acc_crop0.5")
            wall = f"{row['train_seconds']:.0f}" + (" *" if row.get("note") else "")
            print(
                f"| {describe(probe, row)} | {row['bits']} | {row['steps']} | {row.get('psnr_target', '-')} | {wall} "
                f"| {row['bit_acc']:.3f} | {row['psnr']:.1f} | {row['bit_acc_shift3']:.3f} "
                f"| {'-' if crop is None else f'{crop:.3f}'} |"
            )
    print("\n\\* ran beside another training on the 2 cores: its wall time is not comparable.")


if __name__ == "__main__":
    main()
