"""What bounds the collusion sweep's fid_proxy ratio? Decompose the Frechet distances.

The sweep's target is "with ACT all, 2-party averaging raises fid_proxy at least 3x over 2-party
averaging without ACT". This script splits each fid_proxy (the sweep's own: copy outputs vs the
held-out real images, 256 of them) into ``|mu - mu_real|^2`` and the feature spread ``tr(S)``, for
the sweep's sets (base decoder, un-attacked copy, 2-party averages per ACT type, adaptive
colluder) and for reference sets that bracket the scale:

- ``disjoint_real``: other real images (the proxy's clean-vs-clean floor at this sample size);
- ``per_image_mean``: every real image replaced by its own mean colour (all content gone, colour
  kept) and ``gray``: every image the data set's mean colour. A content-free image set scores
  about ``tr(S_real)`` plus a mean term: that is the ceiling of "wrecked to flat colour".

If the base decoder's reconstructions already sit far from the real images, the ratio
"wrecked / no-ACT average" is bounded by ceiling / floor whatever ACT does. Run it on two
checkpoints (e.g. the shipped one and an older one extracted with ``git show``) to compare
base VAEs:

    python experiments/fid_proxy_floor.py [--checkpoint DIR] [--label NAME] [--seed 0]

Prints a table and appends JSON lines to ``experiments/results/fid_proxy_floor.jsonl``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from fingerprint_lm.data.synthetic import ProceduralImages
from fingerprint_lm.errors import exit_on_user_error
from fingerprint_lm.evaluation.collusion import Point, PointSettings, evaluate_point
from fingerprint_lm.metrics.fid import _covariance, frechet_distance, proxy_features, train_proxy_feature_net
from fingerprint_lm.metrics.quality import psnr
from fingerprint_lm.models.checkpoint import load_fingerprint_model
from fingerprint_lm.storage import append_jsonl

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results" / "fid_proxy_floor.jsonl"
POINTS = (("none", "none", 1), *((act, "average", 2) for act in ("none", "permute", "sign", "scale", "all")),
          ("all", "aligned_average", 2))


def sweep_point_images(model, act, attack, colluders, n_images, seed, fid_net):
    """Run the sweep's own evaluation and keep the images it scores: the attacked model's outputs,
    the base decoder's and the real images."""
    settings = PointSettings(n_images=n_images, n_innocents=10)
    result = evaluate_point(model, Point(act, attack, None, colluders), settings, seed, fid_net)
    images = result.images
    return result.as_dict(), images.outputs, images.base_outputs, images.real


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", default=None, help="fingerprint checkpoint dir (default: the shipped one)")
    parser.add_argument("--label", default="shipped")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-images", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache-dir", default=str(ROOT / ".cache" / "fingerprint_lm"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_fingerprint_model(args.checkpoint)
    resolution = int(model.meta.get("resolution", 32))
    fid_net = train_proxy_feature_net(resolution, steps=1000, cache_dir=args.cache_dir)

    sets: dict[str, torch.Tensor] = {}
    for act, attack, colluders in POINTS:
        _, outputs, base_outputs, real = sweep_point_images(model, act, attack, colluders, args.n_images,
                                                            args.seed, fid_net)
        sets[f"{attack}_c{colluders}_{act}" if attack != "none" else "copy"] = outputs
        sets["base"], sets["real"] = base_outputs, real
    real = sets["real"]
    sets["disjoint_real"] = torch.stack(
        [ProceduralImages(resolution, 777, args.n_images).sample(i)["image"] for i in range(args.n_images)]
    )
    sets["per_image_mean"] = real.mean(dim=(2, 3), keepdim=True).expand_as(real).clone()
    sets["gray"] = real.mean(dim=(0, 2, 3), keepdim=True).expand_as(real).clone()

    features = proxy_features(real, fid_net)
    mu_real, sigma_real = features.mean(0), _covariance(features)
    print(f"\n{args.label}: {args.n_images} images, seed {args.seed}, tr(S_real) = {float(sigma_real.trace()):.1f}\n")
    print("| set | fid_proxy vs real | |mu - mu_real|^2 | tr(S) | PSNR vs real | pixel std |")
    print("|---|---|---|---|---|---|")
    rows = []
    for name, images in sets.items():
        f = proxy_features(images, fid_net)
        mu, sigma = f.mean(0), _covariance(f)
        row = {
            "date": time.strftime("%Y-%m-%d"), "label": args.label, "seed": args.seed, "n_images": args.n_images,
            "set": name, "fid_proxy": frechet_distance(mu, sigma, mu_real, sigma_real),
            "mean_term": float((mu - mu_real) @ (mu - mu_real)), "trace": float(sigma.trace()),
            "psnr_vs_real": float(psnr(images, real).mean()) if name != "real" else None,
            "pixel_std": float(images.std()),
        }
        rows.append(row)
        psnr_text = f"{row['psnr_vs_real']:.2f}" if row["psnr_vs_real"] is not None else "-"
        print(f"| {name} | {row['fid_proxy']:.1f} | {row['mean_term']:.1f} | {row['trace']:.1f} | {psnr_text} "
              f"| {row['pixel_std']:.3f} |")
    by_name = {r["set"]: r["fid_proxy"] for r in rows}
    print(f"\nACT all / no ACT (2-party average): {by_name['average_c2_all'] / by_name['average_c2_none']:.2f}x; "
          f"ceiling per_image_mean / floor base: {by_name['per_image_mean'] / by_name['base']:.2f}x")
    append_jsonl(RESULTS, *rows)


if __name__ == "__main__":
    exit_on_user_error(main)
