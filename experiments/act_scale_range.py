"""Does a wider ACT scale range make 2-party averages worse? Stream ACT ``all`` on the shipped
checkpoint, log-uniform group scales in [1/4, 4] (shipped) vs [1/16, 16], seeds 4-11 (seeds 0-3 are
act_scope_search.py's). Prints the fid_proxy ratio over 2-party averaging without ACT per seed.

    python experiments/act_scale_range.py        # about 3 minutes on one core

Measured 2026-11-23 (results/act_scale_range.txt): mean ratio 2.49 ([1/4, 4]) vs 2.44 ([1/16, 16]);
the wider range only widens the spread (1.50-4.25), so the shipped range stays.
"""

from __future__ import annotations

import torch

from fingerprint_lm.evaluation.collusion import Point, PointSettings, evaluate_point
from fingerprint_lm.metrics.fid import train_proxy_feature_net
from fingerprint_lm.models.checkpoint import load_fingerprint_model


def main() -> None:
    torch.set_num_threads(1)
    model = load_fingerprint_model()
    fid_net = train_proxy_feature_net(32, steps=1000, cache_dir=".cache/fingerprint_lm")
    seeds = range(4, 12)

    def fid(seed: int, act: str, scale_range=(0.25, 4.0)) -> float:
        settings = PointSettings(n_images=256, n_innocents=100, act_scope="stream", scale_range=scale_range)
        return evaluate_point(model, Point(act, "average", None, 2), settings, seed, fid_net).fid_proxy

    base = {s: fid(s, "none") for s in seeds}
    print("no ACT fid_proxy", [f"{base[s]:.1f}" for s in seeds], flush=True)
    for scale_range in ((0.25, 4.0), (1 / 16, 16.0)):
        ratios = [fid(s, "all", scale_range) / base[s] for s in seeds]
        print(scale_range, [f"{x:.2f}" for x in ratios], f"mean ratio {sum(ratios) / len(ratios):.2f}", flush=True)


if __name__ == "__main__":
    main()
