"""Where should ACT act? ResnetBlock interiors, the residual stream, or both.

The collusion sweep's target is "with ACT all, 2-party averaging raises fid_proxy at least 3x over
2-party averaging without ACT and drops PSNR by at least 10 dB". Interior-only ACT (the first
implementation) reached 2.2x. This script evaluates 2-party averaging (and the adaptive colluder's
aligned average, and an un-attacked copy) on the shipped checkpoint for every ACT scope x type,
with the sweep's own evaluation (``fingerprint_lm.evaluation.collusion.evaluate_point``), prints a table
and appends JSON lines to ``experiments/results/act_scope_search.jsonl``.

    python experiments/act_scope_search.py [--seeds 0 1 2] [--n-images 256] [--threads 2]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from fingerprint_lm.evaluation.collusion import Point, PointSettings, evaluate_point
from fingerprint_lm.metrics.fid import train_proxy_feature_net
from fingerprint_lm.models.act import ACT_SCOPES, ACT_TYPES
from fingerprint_lm.models.checkpoint import load_fingerprint_model
from fingerprint_lm.storage import append_jsonl

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results" / "act_scope_search.jsonl"
CASES = (("none", 1), ("average", 2), ("aligned_average", 2))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--n-images", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--label", default="shipped", help="names the checkpoint in the JSON rows")
    parser.add_argument("--cache-dir", default=str(ROOT / ".cache" / "fingerprint_lm"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_fingerprint_model()  # the shipped embedded checkpoint
    fid_net = train_proxy_feature_net(int(model.meta.get("resolution", 32)), steps=1000, cache_dir=args.cache_dir)
    rows = []
    for seed in args.seeds:
        for scope in ACT_SCOPES:
            for act in ACT_TYPES:
                if act == "none" and scope != "interior":
                    continue  # no ACT: the scope changes nothing
                for attack, colluders in CASES:
                    start = time.perf_counter()
                    settings = PointSettings(n_images=args.n_images, n_innocents=100, act_scope=scope)
                    m = evaluate_point(model, Point(act, attack, None, colluders), settings, seed, fid_net).as_dict()
                    row = {
                        "date": time.strftime("%Y-%m-%d"), "label": args.label, "threads": args.threads, "seed": seed,
                        "scope": scope if act != "none" else "-", "act": act, "attack": attack,
                        "colluders": colluders, "bit_acc": m["bit_acc"], "psnr": m["psnr"], "ssim": m["ssim"],
                        "fid_proxy": m["fid_proxy"], "fid_proxy_base": m["fid_proxy_base"],
                        "seconds": time.perf_counter() - start,
                    }
                    rows.append(row)
                    print(f"seed {seed} {row['scope']:8s} {act:7s} {attack:15s} c{colluders} "
                          f"bit_acc {m['bit_acc']:.3f} "
                          f"psnr {m['psnr']:6.2f} fid_proxy {m['fid_proxy']:7.1f}", flush=True)
    append_jsonl(RESULTS, *rows)

    # The table: per scope x type, means over seeds; ratio = fid_proxy(average, this ACT) / fid_proxy(average, none).
    def mean(values):
        return sum(values) / len(values)

    def pick(scope, act, attack, key):
        return mean([r[key] for r in rows if r["scope"] == scope and r["act"] == act and r["attack"] == attack])

    none_fid = pick("-", "none", "average", "fid_proxy")
    none_psnr = pick("-", "none", "average", "psnr")
    print(f"\n2-party average without ACT: psnr {none_psnr:.2f} dB, fid_proxy {none_fid:.1f} "
          f"(seeds {args.seeds}, {args.n_images} images)\n")
    print("| scope | ACT | copy bit_acc | avg PSNR | PSNR drop | avg fid_proxy | ratio vs no ACT "
          "| aligned avg PSNR | aligned fid_proxy |")
    print("|---|---|---|---|---|---|---|---|---|")
    for scope in ACT_SCOPES:
        for act in ACT_TYPES[1:]:
            fid = pick(scope, act, "average", "fid_proxy")
            psnr = pick(scope, act, "average", "psnr")
            print(f"| {scope} | {act} | {pick(scope, act, 'none', 'bit_acc'):.3f} | {psnr:.2f} | "
                  f"{none_psnr - psnr:.2f} | "
                  f"{fid:.1f} | {fid / none_fid:.2f} | {pick(scope, act, 'aligned_average', 'psnr'):.2f} | "
                  f"{pick(scope, act, 'aligned_average', 'fid_proxy'):.1f} |")


if __name__ == "__main__":
    main()
