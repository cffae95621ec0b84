"""False accusations on unmarked images, per method (issue 11's target: 10^4 unmarked images,
1000 registered users, fpr 1e-6: nobody accused).

For each shipped checkpoint: ``--images`` held-out procedural images decoded by the *base* decoder
(unmarked; the checkpoint's ``reference_vae``, the base as it was, when training moved the shared
decoder), read by the method's reader (pnm: its content reader, since 2026-12-07), and identified
against ``--users`` random registered codes (the distributor's attribution: hard decoding, nearest
code, binomial p-value; and soft decoding, the default since 2026-12-04, logit-weighted score
with its exact p-value; Bonferroni over the registry either way). Printed: users accused by
each, the images soft decoding would accuse at fpr 1e-3 (at most about images x 1e-3 if the
p-values are calibrated), the share of 1-bits (balanced is 0.5), and the best-match bit counts
against what independent fair bits predict (the maximum over the registry of Binomial(k, 1/2)).

    python experiments/unmarked_attribution.py --images 10000 --users 1000

Rows are appended to ``results/unmarked_attribution.jsonl``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from fingerprint_lm.data.datamodule import TEST_SEED_OFFSET
from fingerprint_lm.data.synthetic import ProceduralImages
from fingerprint_lm.errors import exit_on_user_error
from fingerprint_lm.models import batched
from fingerprint_lm.models.checkpoint import load_fingerprint_model, shipped_checkpoint
from fingerprint_lm.registry.index import CodeIndex
from fingerprint_lm.registry.soft import soft_identify
from fingerprint_lm.storage import append_jsonl

RESULTS = Path(__file__).resolve().parent / "results" / "unmarked_attribution.jsonl"


def expected_best_match(k: int, users: int, samples: int, rng: np.random.Generator) -> np.ndarray:
    """Best-match counts of random fair bits against ``users`` random codes (simulated)."""
    return rng.binomial(k, 0.5, size=(samples, users)).max(axis=1)


@torch.no_grad()
def run(checkpoint: str, n_images: int, n_users: int, fpr: float, seed: int) -> dict:
    model = load_fingerprint_model(shipped_checkpoint(checkpoint))
    k = model.fingerprint_bits
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 2, size=(n_users, k), dtype=np.uint8)
    index = CodeIndex.from_bits([f"user{i}" for i in range(n_users)], codes)
    images = ProceduralImages(32, seed=TEST_SEED_OFFSET + 500 + seed, length=n_images)
    start = time.perf_counter()
    found = torch.stack([images.sample(i)["image"] for i in range(n_images)])
    unmarked = batched.decode(model.unmarked_vae, batched.encode(model.vae, found, batch_size=256), batch_size=256)
    logits = batched.extract(model.reader, unmarked, batch_size=256).double().numpy()
    hard = (logits > 0).astype(np.uint8)
    results = index.identify_many(hard, fpr=fpr)
    # One soft pass at 1e-3: where the registry's best p-value is <= 1e-3 the row is that user's, so
    # the count at the (smaller) fpr is read from the same rows.
    soft = soft_identify(logits, index, fpr=max(fpr, 1e-3))
    best = np.array([r["matching_bits"] for r in results])
    simulated = expected_best_match(k, n_users, 2000, rng)
    return {
        "method": model.method, "checkpoint": checkpoint, "bits": k, "images": n_images, "users": n_users,
        "fpr": fpr, "accused": int(sum(r["accused"] for r in results)), "ones_share": float(hard.mean()),
        "soft_accused": int(sum(r["accused"] and r["p_value"] <= fpr for r in soft)),
        "soft_accused_at_1e-3": int(sum(r["accused"] and r["p_value"] <= 1e-3 for r in soft)),
        "best_match_mean": float(best.mean()), "best_match_max": int(best.max()),
        "expected_best_match_mean": float(simulated.mean()),
        "expected_best_match_99pct": float(np.percentile(simulated, 99)),
        "seconds": round(time.perf_counter() - start, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--fpr", type=float, default=1e-6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoints", nargs="+", default=["embedded", "embedded_pnm"])
    args = parser.parse_args()
    print("| method | images | users | fpr | accused: hard / soft | soft at fpr 1e-3 | share of 1-bits "
          "| best match: mean / max | fair bits predict: mean / 99th pct |")
    print("|---|---|---|---|---|---|---|---|---|")
    for checkpoint in args.checkpoints:
        row = run(checkpoint, args.images, args.users, args.fpr, args.seed)
        print(f"| {row['method']} | {row['images']} | {row['users']} | {row['fpr']:g} | {row['accused']} / "
              f"{row['soft_accused']} | {row['soft_accused_at_1e-3']} "
              f"| {row['ones_share']:.3f} | {row['best_match_mean']:.2f} / {row['best_match_max']} "
              f"| {row['expected_best_match_mean']:.2f} / {row['expected_best_match_99pct']:.0f} |")
        append_jsonl(RESULTS, row)


if __name__ == "__main__":
    exit_on_user_error(main)
