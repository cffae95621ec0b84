"""How strict should the predicted screen be, now that a draw costs nothing? (issues 11 and 14)

The probe screen's floors were chosen where a stricter bit floor stopped paying for the smaller
pass rate that attribution's bound divides p-values by (``screen_policy.py``), with every draw
costing a decoder pass. The read predictor (``distributor/read_predictor.py``) makes a draw free,
so only the bound limits how strict it can be. This reads ``--codes`` random codes' copies of the
checkpoint (probe and ``--images`` held-out images, 8-bit pixels; ``screen_policy.read_codes``)
once, predicts each code's read with the checkpoint's recorded predictor, and scores predicted
screens at several pass rates (``--rates``: the bit threshold that passes that share of 10^5
fresh codes among those whose predicted PSNR clears the floor) and predicted PSNR floors
(``--min-psnr``), each with attribution among ``--registry`` users at fpr x its pass rate, as
``screen_policy.score_kept`` scores them. The probe screen at the recorded floors is the first row.

    python experiments/predicted_screen_policy.py --codes 2000

Prints a markdown table; the run is appended to ``results/predicted_screen_policy.jsonl``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from screen_policy import cached_read_codes, check_setting_arguments, score_kept, setting, setting_arguments

from fingerprint_lm.distributor.read_predictor import bit_threshold, fresh_predictions, recorded_predictor
from fingerprint_lm.errors import check_float, exit_on_user_error
from fingerprint_lm.storage import append_jsonl

RESULTS = Path(__file__).resolve().parent / "results" / "predicted_screen_policy.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    setting_arguments(parser, codes=2000, images=64, seed=71)
    parser.add_argument("--rates", type=float, nargs="+", default=[0.36, 0.25, 0.15, 0.1, 0.05])
    parser.add_argument("--min-psnr", type=float, nargs="+", default=[29.9, 30.0, 30.1])
    parser.add_argument("--cache", default=None, help="an .npz file for the reads, reused when its settings match")
    args = parser.parse_args()
    check_setting_arguments(args)
    for value in args.rates:
        check_float("--rates", value, above=0.0, maximum=1.0)
    for value in args.min_psnr:
        check_float("--min-psnr", value, above=0.0)
    started = time.time()
    context = setting(args)
    predictor, record = recorded_predictor(context.model)
    floors = context.model.meta["issue_screen"]
    reads = cached_read_codes(context, args, Path(args.cache) if args.cache else None)
    predicted, fresh = predictor(context.codes), fresh_predictions(predictor, args.seed + 1)
    probe_kept = (reads["probe_acc"] >= floors["min_probe_bit_acc"]) & (reads["probe_psnr"] >= floors["min_probe_psnr"])
    rows = [{"screen": "probe (recorded floors)", **score_kept(reads, probe_kept, args.fpr)}]
    for min_psnr in args.min_psnr:
        for rate in args.rates:
            threshold = bit_threshold(fresh, rate, min_psnr)
            kept = (predicted[:, 0] >= threshold) & (predicted[:, 1] >= min_psnr)
            if kept.any():
                rows.append({"screen": f"predicted, {rate:.0%} of fresh codes, {min_psnr} dB", "threshold": threshold,
                             **score_kept(reads, kept, args.fpr)})
    seconds = round(time.time() - started, 1)
    print(f"{args.codes} random codes of {args.checkpoint} (recorded predictor: {record['fit_codes']} fit codes), "
          f"{args.images} held-out images each (8-bit), registry {args.registry}, fpr {args.fpr:g} x pass rate\n")
    print("| screen | codes kept | pass rate here | attributed (p / rate) | worst code | bit_acc | PSNR mean | "
          "worst copy | copies >= 30 dB |\n|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['screen']} | {r['codes_kept']} | {r['pass_rate']:.3f} | {r['attributed']:.4f} | "
              f"{r['worst_code']:.3f} | {r['bit_acc']:.4f} | {r['mean_psnr']:.2f} | {r['min_psnr_copy']:.2f} | "
              f"{r['copies_at_30db']:.0%} |")
    print(f"\n{seconds:.0f} s")
    append_jsonl(RESULTS, {"date": time.strftime("%Y-%m-%d"), **vars(args), "seconds": seconds, "rows": rows})


if __name__ == "__main__":
    exit_on_user_error(main)
