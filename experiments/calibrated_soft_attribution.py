"""Per-bit calibrated soft attribution on the shipped pnm checkpoint (issue 11; README "Tracing
leftovers" listed it as untried).

Soft attribution (``fingerprint_lm/registry/soft.py``) scores a registered code by the sum of the
extractor's logits, signed by the code's bits, and its p-value is exact for *any* weights that are
fixed given the image, since innocents' codes are fair coins drawn independently of it. The raw
logit is the right weight only if every bit is equally reliable. Here the distributor fits, on its
own copies (``--fit-users`` codes it draws itself, never registered), one logistic slope per bit,
``P(bit = 1 | logit l) = sigmoid(a_j * l)``, so ``a_j * l`` is that bit's log-likelihood ratio;
those become the weights. It then attributes fresh images of ``--users`` other copies, among
``--registry`` codes at fpr 1e-6, with raw and calibrated weights, under the attacks of
``soft_attribution.py``, and counts accusations of unmarked (base decoder) images. A
two-parameter variant adds a per-bit offset (``a_j * l + b_j``: a bit whose reader leans one way).

    python experiments/calibrated_soft_attribution.py --fit-users 32 --users 8

Prints a markdown table; rows are appended to ``results/calibrated_soft_attribution.jsonl``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from soft_attribution import CASES, _count, attacked, issue_copies

from fingerprint_lm.distributor.generation import decode_with, held_out_images
from fingerprint_lm.errors import check_int, check_probability, exit_on_user_error
from fingerprint_lm.models import batched
from fingerprint_lm.models.checkpoint import load_fingerprint_model, shipped_checkpoint
from fingerprint_lm.registry.soft import soft_identify
from fingerprint_lm.storage import append_jsonl

RESULTS = Path(__file__).resolve().parent / "results" / "calibrated_soft_attribution.jsonl"


def fit_logistic(logits: np.ndarray, bits: np.ndarray, offset: bool, steps: int = 50) -> np.ndarray:
    """Per-bit logistic regression of the bit on its logit by Newton's method: (k, 2) array of
    slope and offset (offset 0 when ``offset`` is False)."""
    params = np.zeros((logits.shape[1], 2))
    params[:, 0] = 1.0
    for j in range(logits.shape[1]):
        x = np.stack([logits[:, j], np.ones(len(logits))], axis=1) if offset else logits[:, j : j + 1]
        w = params[j, : x.shape[1]].copy()
        for _ in range(steps):
            p = 1 / (1 + np.exp(-x @ w))
            grad = x.T @ (bits[:, j] - p)
            hess = (x * (p * (1 - p))[:, None]).T @ x + 1e-6 * np.eye(x.shape[1])
            w += np.linalg.solve(hess, grad)
        params[j, : x.shape[1]] = w
    return params


def weigh(logits: np.ndarray, params: np.ndarray) -> np.ndarray:
    return logits * params[:, 0] + params[:, 1]


@torch.no_grad()
def calibration(model, fit_users: int, n_images: int, seed: int) -> dict[str, np.ndarray]:
    """Logits of the distributor's own copies (codes it draws, ACT all) on images of another seed."""
    images = held_out_images(model.meta.get("resolution", 32), n_images, seed=seed + 1000)
    codes, _, outputs = issue_copies(model, fit_users, fit_users, images, seed + 1000)
    logits = batched.extract(model.extractor, torch.cat(outputs), "cpu").double().numpy()
    bits = np.repeat(codes[:fit_users], n_images, axis=0).astype(np.float64)
    return {"slope": fit_logistic(logits, bits, offset=False), "slope+offset": fit_logistic(logits, bits, offset=True)}


@torch.no_grad()
def measure(args) -> list[dict]:
    model = load_fingerprint_model(shipped_checkpoint(args.checkpoint))
    # the reader before its shipped per-bit calibration (2026-12-06), which this probe led to: the
    # "raw logit" column is the uncalibrated reader, and the fits are made on it
    model.extractor.bit_scale.fill_(1.0)
    fits = calibration(model, args.fit_users, args.fit_images, args.seed)
    raw = np.stack([np.ones(model.fingerprint_bits), np.zeros(model.fingerprint_bits)], axis=1)  # slope 1, offset 0
    weightings = {"raw logit": raw, **fits}
    images = held_out_images(model.meta.get("resolution", 32), args.images, seed=args.seed)
    codes, index, outputs = issue_copies(model, args.users, args.registry, images, args.seed)
    truth = np.repeat(np.arange(args.users), args.images)
    rows = []
    for case in CASES:
        batch = torch.cat([attacked(out, case, args.seed + u) for u, out in enumerate(outputs)])
        logits = batched.extract(model.extractor, batch, "cpu").double().numpy()
        row = {"case": case, "bit_acc": float(((logits > 0) == codes[truth]).mean())}
        for name, params in weightings.items():
            row[name] = _count(soft_identify(weigh(logits, params), index, fpr=args.fpr), truth, index)
        rows.append(row)
    base = decode_with(model.vae, model.unmarked_vae, images)
    logits = batched.extract(model.extractor, base, "cpu").double().numpy()
    unmarked = {name: sum(r["accused"] for r in soft_identify(weigh(logits, params), index, fpr=args.fpr))
                for name, params in weightings.items()}
    rows.append({"case": "unmarked (base decoder)", "accused": unmarked})
    slopes = fits["slope"][:, 0]
    rows.append({"case": "fitted slopes", "min": float(slopes.min()), "median": float(np.median(slopes)),
                 "max": float(slopes.max())})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="embedded_pnm")
    parser.add_argument("--fit-users", type=int, default=32)
    parser.add_argument("--fit-images", type=int, default=128)
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--registry", type=int, default=1000)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--fpr", type=float, default=1e-6)
    parser.add_argument("--seed", type=int, default=5)
    args = parser.parse_args()
    for name in ("fit_users", "fit_images", "users", "images"):
        check_int(f"--{name.replace('_', '-')}", getattr(args, name))
    check_int("--registry", args.registry, args.users)
    check_probability("--fpr", args.fpr)  # as soft_attribution.py checks it
    started = time.time()
    rows = measure(args)
    names = ["raw logit", "slope", "slope+offset"]
    print(f"attribution rate (wrong accusations) among {args.registry} users, fpr {args.fpr}, "
          f"{args.users} copies x {args.images} held-out images; weights fitted on {args.fit_users} "
          f"other copies x {args.fit_images} images\n")
    print("| case | bit_acc | " + " | ".join(names) + " |\n|" + "---|" * (2 + len(names)))
    for row in rows:
        if "accused" in row:
            print(f"| {row['case']} | | " + " | ".join(f"{row['accused'][n]} accused" for n in names) + " |")
        elif "bit_acc" in row:
            print(f"| {row['case']} | {row['bit_acc']:.3f} | "
                  + " | ".join(f"{row[n][0]:.3f} ({row[n][1]})" for n in names) + " |")
    slopes = rows[-1]
    print(f"\nfitted slopes a_j: min {slopes['min']:.3f}, median {slopes['median']:.3f}, max {slopes['max']:.3f}")
    print(f"{time.time() - started:.0f} s")
    append_jsonl(RESULTS, *({"date": time.strftime("%Y-%m-%d"), **vars(args), **row} for row in rows))


if __name__ == "__main__":
    exit_on_user_error(main)
