"""Is soft-decision attribution's false-accusation bound kept on real extractor logits? (issue 13)

The soft p-value (``fingerprint_lm/registry/soft.py``) is exact given the image when the
registered codes are fair coins drawn independently of it, so over random registries the expected
number of unmarked images accused at ``fpr`` among ``N`` users is at most ``fpr x images``. One
registry is a poor check: every image is scored against the same ``N`` codes, so the count of a
single registry scatters more than a Poisson count would. This reads ``--images`` unmarked
held-out images through the base decoder (the checkpoint's ``reference_vae`` where it ships one)
once, then draws ``--registries`` fresh registries of ``--users`` codes and reports the mean,
spread and maximum of the accusations at each fpr against the bound, and the share of (image,
code) pairs whose uncorrected p-value is at most 1e-2 and 1e-3 (the bound: those values). The
same for ``soft_whitened`` decoding (the extractor's soft weights: the carrier reader's logits
whitened on unmarked images, pnm's logits as they are) and for hard decoding (the logits' signs:
the binomial test is this test with equal weights).

    python experiments/soft_calibration.py --checkpoints embedded_pnm embedded

Rows are appended to ``results/soft_calibration.jsonl``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from fingerprint_lm.data.datamodule import TEST_SEED_OFFSET
from fingerprint_lm.data.synthetic import ProceduralImages
from fingerprint_lm.errors import check_int, exit_on_user_error
from fingerprint_lm.models import batched
from fingerprint_lm.models.checkpoint import load_fingerprint_model, shipped_checkpoint
from fingerprint_lm.models.extractor import soft_weights
from fingerprint_lm.registry.soft import null_tail, quantized_weights
from fingerprint_lm.storage import append_jsonl

RESULTS = Path(__file__).resolve().parent / "results" / "soft_calibration.jsonl"
FPRS = (1e-3, 1e-2)


@torch.no_grad()
def procedural_unmarked_logits(model, seed: int, n_images: int) -> np.ndarray:
    """The extractor's logits ``float64 [n, k]`` of the base decoder's (unmarked) outputs of the
    first ``n_images`` procedural images of ``seed``."""
    stream = ProceduralImages(32, seed=seed, length=n_images)
    images = torch.stack([stream.sample(i)["image"] for i in range(n_images)])
    decoded = batched.decode(model.unmarked_vae, batched.encode(model.vae, images))
    return batched.extract(model.extractor, decoded).double().numpy()


def unmarked_logits(checkpoint: str, n_images: int) -> tuple[str, np.ndarray, np.ndarray]:
    model = load_fingerprint_model(shipped_checkpoint(checkpoint))
    logits = procedural_unmarked_logits(model, TEST_SEED_OFFSET + 900, n_images)
    return model.method, logits, soft_weights(model.extractor, logits)  # what each decoding reads


def tail_table(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every image's exact null tail as one padded table ``[n, width]`` and the sums' lower ends."""
    tails = [null_tail(row) for row in weights]
    width = max(len(tail) for _, tail in tails) + 1  # the last column stays 0: beyond every sum
    table = np.zeros((len(tails), width))
    for i, (_, tail) in enumerate(tails):
        table[i, : len(tail)] = tail
    return table, np.array([low for low, _ in tails])


def calibrate(logits: np.ndarray, users: int, registries: int, seed: int) -> dict:
    weights = quantized_weights(logits)
    table, lows = tail_table(weights)
    rows, width = np.arange(len(weights)), table.shape[1] - 1
    rng = np.random.default_rng(seed)
    accused = {fpr: [] for fpr in FPRS}
    pairs = {fpr: [] for fpr in FPRS}
    for _ in range(registries):
        codes = rng.integers(0, 2, (users, weights.shape[1])).astype(np.float64)
        scores = (weights.astype(np.float64) @ codes.T).astype(np.int64)  # exact: small integers
        best = table[rows, np.clip(scores.max(axis=1) - lows, 0, width)] * users  # Bonferroni
        first = table[rows, np.clip(scores[:, 0] - lows, 0, width)]  # one code, uncorrected
        for fpr in FPRS:
            accused[fpr].append(int((best <= fpr).sum()))
            pairs[fpr].append(float((first <= fpr).mean()))
    out = {}
    for fpr in FPRS:
        counts = np.array(accused[fpr])
        out[f"{fpr:g}"] = {"bound": fpr * len(weights), "mean": float(counts.mean()), "std": float(counts.std()),
                           "max": int(counts.max()), "pairs_at_or_below": float(np.mean(pairs[fpr]))}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", nargs="+", default=["embedded_pnm", "embedded"])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--registries", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    for name in ("images", "users", "registries"):
        check_int(f"--{name}", getattr(args, name))
    print(f"unmarked images accused among {args.users} users, over {args.registries} random registries\n")
    print("| method | decoding | images | fpr | bound (fpr x images) | mean | std | max "
          "| one code: share of pairs with p <= fpr |")
    print("|---|---|---|---|---|---|---|---|---|")
    for checkpoint in args.checkpoints:
        start = time.perf_counter()
        method, logits, weights = unmarked_logits(checkpoint, args.images)
        result = {decoding: calibrate(values, args.users, args.registries, args.seed)
                  for decoding, values in (("soft", logits), ("soft_whitened", weights), ("hard", np.sign(logits)))}
        for decoding, rows in result.items():
            for fpr, row in rows.items():
                print(f"| {method} | {decoding} | {args.images} | {fpr} | {row['bound']:g} | {row['mean']:.2f} "
                      f"| {row['std']:.2f} | {row['max']} | {row['pairs_at_or_below']:.5f} |")
        append_jsonl(RESULTS, {"date": time.strftime("%Y-%m-%d"), "checkpoint": checkpoint, "method": method,
                               **{k: v for k, v in vars(args).items() if k != "checkpoints"}, "result": result,
                               "seconds": round(time.perf_counter() - start, 1)})


if __name__ == "__main__":
    exit_on_user_error(main)
