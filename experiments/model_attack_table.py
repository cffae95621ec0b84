"""Model-level attacks on saved checkpoints, scored the way the sweep scores them
(``evaluation.collusion.evaluate_point``: a fresh copy, 256 held-out images, 1000 innocents, act
none). Used to weigh the worst-case term against what it costs in clean bit accuracy (issue 11):

    python experiments/model_attack_table.py embedded_pnm /path/to/fingerprint_model [...]

A name without a slash is a shipped checkpoint (``fingerprint_lm/assets/<name>``). Rows are
appended to ``results/model_attack_table.jsonl`` and the table is printed. ``--cases`` scores other
cases instead, e.g. the removal attacks (``results/removal_attacks.md``):

    python experiments/model_attack_table.py embedded_pnm embedded_wouaf embedded \
        --cases none_c1 estimate_remove spectral_remove_0.5 spectral_remove
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from fingerprint_lm.attacks.cases import parse_case
from fingerprint_lm.errors import ConfigError
from fingerprint_lm.evaluation.collusion import Point, PointSettings, evaluate_point
from fingerprint_lm.models.checkpoint import SHIPPED_CHECKPOINT, load_fingerprint_model
from fingerprint_lm.storage import append_jsonl

RESULTS = Path(__file__).resolve().parent / "results"
CASES = ("none_c1", "weight_noise_0.05", "prune_0.3", "quantize_int8", "finetune_50", "finetune_500")


def score_model(model, cases: tuple[str, ...] = CASES) -> dict:
    """Bit accuracy of a fresh copy of ``model`` under each case (``none_c1`` first: it adds PSNR)."""
    row = {}
    settings = PointSettings(n_images=256, n_innocents=1000)
    for case in cases:
        result = evaluate_point(model, Point.from_case("none", case), settings, seed=0)
        row[case] = round(result.bit_acc, 4)
        row[f"psnr_{case}"] = round(result.psnr, 2)  # what the attack cost in quality
        if case == "none_c1":
            row["psnr"] = round(result.psnr, 2)
    return row


def score(path: Path, cases: tuple[str, ...] = CASES) -> dict:
    return {"checkpoint": str(path), **score_model(load_fingerprint_model(path), cases)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cases", nargs="+", default=list(CASES), help="sweep cases (none_c1 first: it adds PSNR)")
    args = parser.parse_args()
    cases = tuple(args.cases)
    for case in cases:
        try:
            parse_case(case)
        except ConfigError as exc:
            parser.error(str(exc))
    paths = [Path(name) if "/" in name else SHIPPED_CHECKPOINT.parent / name for name in args.checkpoints]
    for path in paths:
        if not (path / "fingerprint.json").is_file():
            parser.error(f"no fingerprint checkpoint at {path} (fingerprint.json missing)")
    torch.set_num_threads(args.threads)
    rows = []
    for path in paths:
        row = score(path, cases)
        rows.append(row)
        print(json.dumps(row), flush=True)
        append_jsonl(RESULTS / "model_attack_table.jsonl", {"date": time.strftime("%Y-%m-%d %H:%M"), **row})
    print("bit_acc (PSNR dB against the base decoder) of one copy under each case")
    print("| checkpoint | " + " | ".join(cases) + " |\n|" + "---|" * (len(cases) + 1))
    for row in rows:
        print(f"| {row['checkpoint']} | " + " | ".join(f"{row[c]} ({row[f'psnr_{c}']})" for c in cases) + " |")


if __name__ == "__main__":
    main()
