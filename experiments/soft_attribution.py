"""Hard against soft-decision attribution on the shipped checkpoints (issues 11 and 13).

Attribution today thresholds each logit and counts matching bits (binomial p-value). The soft
score (``fingerprint_lm/registry/soft.py``) weighs every bit by the extractor's logit and gets an
exact p-value from the innocents' fair-coin codes, so both rules keep the same false-accusation
guarantee; this measures what the soft one buys. For each checkpoint it issues ``--users`` copies
(ACT all), decodes the same held-out images with each copy, applies each attack case, and
attributes every image among the true users plus random innocents (``--registry`` in all, fpr
1e-6, Bonferroni over the registry), with hard and soft decoding and two other bit weightings
(``tanh(l/2)``, the tracing's bounded evidence; ``clip(l, +-1)``). It also attributes the base
decoder's (unmarked) outputs and reports, over every innocent pairing, how often an innocent's
uncorrected p-value falls below 1e-3 and 1e-4 (calibration: at most that fraction).

    python experiments/soft_attribution.py --checkpoint embedded_pnm embedded --users 8

Prints a markdown table; rows are appended to ``results/soft_attribution.jsonl``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from fingerprint_lm.attacks.cases import parse_case
from fingerprint_lm.attacks.image import IMAGE_ATTACKS
from fingerprint_lm.distributor.copies import decoder_from_tensors
from fingerprint_lm.distributor.generation import decode_with, held_out_images
from fingerprint_lm.errors import check_int, check_probability, exit_on_user_error
from fingerprint_lm.methods.base import personal_tensors
from fingerprint_lm.models import batched
from fingerprint_lm.models.checkpoint import load_fingerprint_model, shipped_checkpoint
from fingerprint_lm.models.extractor import soft_weights
from fingerprint_lm.registry.index import CodeIndex
from fingerprint_lm.registry.soft import quantized_weights, soft_identify, soft_tail
from fingerprint_lm.storage import append_jsonl

RESULTS = Path(__file__).resolve().parent / "results" / "soft_attribution.jsonl"
CASES = ("none_c1", "shift_8", "crop_0.5", "rotation_10", "jpeg_q90", "gaussian_blur_s1", "brightness_1.5")
WEIGHTINGS = {"soft (logit)": lambda x: x, "tanh(l/2)": lambda x: np.tanh(x / 2),
              "clip(l, 1)": lambda x: np.clip(x, -1, 1)}


def attacked(images: torch.Tensor, case: str, seed: int) -> torch.Tensor:
    attack, strength, _ = parse_case(case)
    if attack == "none":
        return images
    return IMAGE_ATTACKS[attack](images, strength, torch.Generator().manual_seed(seed))


def rates(logits: np.ndarray, weights: np.ndarray, truth: np.ndarray, index: CodeIndex, fpr: float) -> dict:
    """Attribution rate (right user accused) and wrong accusations, per decoding rule: hard reads
    the logits' signs, ``soft whitened`` the extractor's soft weights (the carrier reader's logits
    whitened on unmarked images; pnm's logits), the other soft rules the logits."""
    out = {}
    hard = index.identify_many((logits > 0).astype(np.uint8), fpr=fpr)
    out["hard"] = _count(hard, truth, index)
    for name, weigh in WEIGHTINGS.items():
        out[name] = _count(soft_identify(weigh(logits), index, fpr=fpr), truth, index)
    out["soft whitened"] = _count(soft_identify(weights, index, fpr=fpr), truth, index)
    return out


def _count(results: list[dict], truth: np.ndarray, index: CodeIndex) -> tuple[float, int]:
    right = sum(r["accused"] and r["user_id"] == index.user_ids[t] for r, t in zip(results, truth, strict=True))
    wrong = sum(r["accused"] and r["user_id"] != index.user_ids[t] for r, t in zip(results, truth, strict=True))
    return right / len(results), wrong


def innocent_calibration(logits: np.ndarray, codes: np.ndarray, truth: np.ndarray) -> dict:
    """Fraction of (image, innocent) pairs whose uncorrected soft p-value is <= 1e-3 and <= 1e-4."""
    weights = quantized_weights(logits)
    scores = weights @ codes.T.astype(np.int64)
    innocent = np.ones_like(scores, dtype=bool)
    innocent[np.arange(len(truth)), truth] = False
    p = soft_tail(weights, scores)[innocent]
    return {"pairs": int(p.size), "p<=1e-3": float((p <= 1e-3).mean()), "p<=1e-4": float((p <= 1e-4).mean())}


@torch.no_grad()
def issue_copies(model, users: int, registry: int, images: torch.Tensor, seed: int,
                 attack=None) -> tuple[np.ndarray, CodeIndex, list]:
    """``registry`` random codes (seeded), their index, and ``images`` decoded by copies (ACT all)
    issued to the first ``users`` of them; ``attack(state, user)``, if given, changes each copy's
    weights first (a model attack). User ``i``'s code and ACT seed do not depend on ``users``."""
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 2, (registry, model.fingerprint_bits), dtype=np.uint8)
    index = CodeIndex.from_bits([f"user{i}" for i in range(registry)], codes)
    outputs = []
    for user in range(users):
        state, bias_map, site = personal_tensors(model, codes[user], "all", int(rng.integers(2**31)))
        if attack is not None:
            state = attack(state, user)
        outputs.append(decode_with(model.vae, decoder_from_tensors(model.vae.config, state, bias_map, site), images))
    return codes, index, outputs


@torch.no_grad()
def measure(checkpoint: str, users: int, registry: int, n_images: int, fpr: float, seed: int) -> list[dict]:
    model = load_fingerprint_model(shipped_checkpoint(checkpoint))
    images = held_out_images(model.meta.get("resolution", 32), n_images, seed=seed)
    codes, index, outputs = issue_copies(model, users, registry, images, seed)
    truth = np.repeat(np.arange(users), n_images)
    rows = []
    for case in CASES:
        batch = torch.cat([attacked(out, case, seed + u) for u, out in enumerate(outputs)])
        logits = batched.extract(model.extractor, batch, "cpu").double().numpy()
        weights = soft_weights(model.extractor, logits)
        bit_acc = float(((logits > 0) == codes[truth]).mean())
        rows.append({"checkpoint": checkpoint, "case": case, "bit_acc": bit_acc,
                     **rates(logits, weights, truth, index, fpr),
                     **({"calibration": innocent_calibration(logits[:: max(1, len(logits) // 256)], codes[:64],
                                                             truth[:: max(1, len(logits) // 256)])}
                        if case == "none_c1" and users <= 64 else {})})
    base = decode_with(model.vae, model.unmarked_vae, images)
    logits = batched.extract(model.extractor, base, "cpu").double().numpy()
    unmarked = {"hard": sum(r["accused"] for r in index.identify_many((logits > 0).astype(np.uint8), fpr=fpr))}
    for name, weigh in WEIGHTINGS.items():
        unmarked[name] = sum(r["accused"] for r in soft_identify(weigh(logits), index, fpr=fpr))
    unmarked["soft whitened"] = sum(r["accused"] for r in soft_identify(soft_weights(model.extractor, logits), index,
                                                                        fpr=fpr))
    rows.append({"checkpoint": checkpoint, "case": "unmarked (base decoder)", "accused": unmarked})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", nargs="+", default=["embedded_pnm"])
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--registry", type=int, default=1000)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--fpr", type=float, default=1e-6)
    parser.add_argument("--seed", type=int, default=5)
    args = parser.parse_args()
    check_int("--users", args.users)
    check_int("--registry", args.registry, args.users)  # the copies' users are registered too
    check_int("--images", args.images)
    check_probability("--fpr", args.fpr)
    names = ["hard", *WEIGHTINGS, "soft whitened"]
    print(f"attribution rate (wrong accusations) among {args.registry} users, fpr {args.fpr}, "
          f"{args.users} copies x {args.images} held-out images\n")
    print("| checkpoint | case | bit_acc | " + " | ".join(names) + " |\n|" + "---|" * (3 + len(names)))
    started = time.time()
    for checkpoint in args.checkpoint:
        rows = measure(checkpoint, args.users, args.registry, args.images, args.fpr, args.seed)
        for row in rows:
            if "accused" in row:
                cells = [f"{row['accused'][n]} accused" for n in names]
                print(f"| {checkpoint} | {row['case']} | | " + " | ".join(cells) + " |")
            else:
                cells = [f"{row[n][0]:.3f} ({row[n][1]})" for n in names]
                print(f"| {checkpoint} | {row['case']} | {row['bit_acc']:.3f} | " + " | ".join(cells) + " |")
        calibration = next(r["calibration"] for r in rows if "calibration" in r)
        print(f"\n{checkpoint}: innocent pairings, soft p-value: {calibration}\n")
        append_jsonl(RESULTS, *({"date": time.strftime("%Y-%m-%d"), **vars(args), **row} for row in rows))
    print(f"{time.time() - started:.0f} s")


if __name__ == "__main__":
    exit_on_user_error(main)
