"""Can soft attribution keep raw-logit tracing and lose the carrier's per-registry scatter? (issue 13)

``results/soft_weight_whitening.md`` found why soft decoding of the carrier reader scatters from
registry to registry: its logits are correlated on unmarked images (largest correlation eigenvalue
16 of 48), so a registered code that lies along a shared direction scores high on many unmarked
images at once. Whitening the weights removes the scatter but mixes a merge's half-strength bits
into the silent ones, and tracing behind merges and blends collapses (README sweep: 2-party
aligned average 0.527 -> 0.020). This script measures a third rule that keeps the raw weights:

- ``soft``: raw logits, the exact p-value over innocents' fair-coin codes (what ships);
- ``soft + code null`` (``decoding=soft_code_null``): the same, and in addition each code's score
  must be improbable *for that code* over unmarked images: with ``m`` and ``S`` the logits' centre
  and covariance on unmarked images and ``s = 2c - 1``, ``z = s.(l - m) / sqrt(s' S s)`` and
  ``N x P[Z >= z] <= fpr`` for a standard normal ``Z``. The exact bound over code draws stands (an
  accusation needs both tests); the second test is the Gaussian approximation that a code aligned
  with a shared direction needs a proportionally higher score. ``m`` and ``S`` are what ships
  (``distributor/attribution.py: code_null``: the carrier reader's fitted whitening, inverted;
  identity for pnm's whitened reader), or with ``--refit`` fitted here on ``--fit`` unmarked
  images of the training stream (median and covariance);
- ``code null only``: the Gaussian per-code test alone, for comparison;
- ``soft_whitened``: the shipped option (the carrier reader's ZCA-whitened logits).

Reported per rule: accusations of ``--images`` unmarked held-out images over ``--registries``
registries of 1000 codes at fpr 1e-3 (mean / std / max; bound on the mean 10 per 10^4), and for
``--users`` copies (ACT all) x ``--per-user`` held-out images per case the rate at which a right
user is accused among 1000 at fpr 1e-6 (for 2-party cases: one of the two colluders).

    python experiments/soft_code_null.py --checkpoints embedded embedded_pnm

Prints a markdown table; rows are appended to ``results/soft_code_null.jsonl``.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from soft_attribution import attacked
from soft_calibration import procedural_unmarked_logits, tail_table
from soft_weight_whitening import check_counts, common_parser, inverse_power

from fingerprint_lm.attacks.collusion import image_blend, merge_copies
from fingerprint_lm.data.datamodule import TEST_SEED_OFFSET
from fingerprint_lm.distributor.attribution import code_null
from fingerprint_lm.distributor.copies import decoder_from_tensors
from fingerprint_lm.distributor.generation import held_out_images
from fingerprint_lm.errors import exit_on_user_error
from fingerprint_lm.methods.base import personal_tensors
from fingerprint_lm.models import batched
from fingerprint_lm.models.checkpoint import load_fingerprint_model, shipped_checkpoint
from fingerprint_lm.models.extractor import soft_weights
from fingerprint_lm.registry.index import CodeIndex
from fingerprint_lm.registry.soft import CodeNull, identify_logits, quantized_weights
from fingerprint_lm.storage import append_jsonl

RESULTS = Path(__file__).resolve().parent / "results" / "soft_code_null.jsonl"
CASES = ("none_c1", "jpeg_q90", "gaussian_blur_s1", "brightness_1.5", "image_blend_c2", "aligned_average_c2",
         "average_c2")
RULES = ("soft", "soft + code null", "code null only", "soft_whitened")


class Tails:
    """Each image's integer weights and exact null tails, per weighting (raw, whitened), built once."""

    def __init__(self, logits: np.ndarray, whitened: np.ndarray):
        self.tables = {}
        for name, values in (("raw", logits), ("whitened", whitened)):
            weights = quantized_weights(values)
            self.tables[name] = (weights, *tail_table(weights))


def decide(rule: str, logits: np.ndarray, tails: Tails, codes: np.ndarray, null: CodeNull, fpr: float,
           gaussian: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per image: accused (bool) and the accused code's row (the best exact score among the codes
    that pass the rule's tests; -1 when nobody is accused)."""
    n_users = len(codes)
    weights, table, lows = tails.tables["whitened" if rule == "soft_whitened" else "raw"]
    scores = (weights.astype(np.float64) @ codes.T.astype(np.float64)).astype(np.int64)
    exact = table[np.arange(len(weights))[:, None], np.clip(scores - lows[:, None], 0, table.shape[1] - 1)] * n_users
    passes = exact <= fpr
    if rule != "soft" and rule != "soft_whitened":
        gaussian = null.p_values(logits, codes) if gaussian is None else gaussian
        passes = (gaussian * n_users <= fpr) & (passes if rule == "soft + code null" else True)
    ranked = np.where(passes, scores if rule != "code null only" else -np.log(np.maximum(gaussian, 1e-300)), -np.inf)
    best = ranked.argmax(axis=1)
    accused = passes.any(axis=1)
    return accused, np.where(accused, best, -1)


def unmarked_spread(logits, whitened, null, registries: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    tails = Tails(logits, whitened)
    counts = {rule: [] for rule in RULES}
    for _ in range(registries):
        codes = rng.integers(0, 2, (1000, logits.shape[1])).astype(np.uint8)
        gaussian = null.p_values(logits, codes)
        for rule in RULES:
            counts[rule].append(int(decide(rule, logits, tails, codes, null, 1e-3, gaussian)[0].sum()))
    return {rule: {"mean": float(np.mean(c)), "std": float(np.std(c)), "max": int(np.max(c))}
            for rule, c in counts.items()}


@torch.no_grad()
def case_logits(model, codes: np.ndarray, users: int, per_user: int, seed: int) -> dict:
    """Per case: the logits of the attacked images and, per image, the rows of the users behind it."""
    images = held_out_images(32, per_user, seed=seed)
    rng = np.random.default_rng(seed)
    copies = [personal_tensors(model, codes[u], "all", int(rng.integers(2**31))) for u in range(users)]
    latents = batched.encode(model.vae, images)
    outputs = [batched.decode(decoder_from_tensors(model.vae.config, *c), latents) for c in copies]
    out = {}
    for case in CASES:
        if case.endswith("_c2"):
            pairs = [(u, (u + 1) % users) for u in range(0, users, 2)]
            batches = [_colluded(model, case, copies, outputs, pair, latents) for pair in pairs]
            truth = [pair for pair in pairs for _ in range(per_user)]
        else:
            batches = [attacked(o, case, seed + u) for u, o in enumerate(outputs)]
            truth = [(u,) for u in range(users) for _ in range(per_user)]
        out[case] = (batched.extract(model.extractor, torch.cat(batches)).double().numpy(), truth)
    return out


def _colluded(model, case: str, copies, outputs, pair, latents) -> torch.Tensor:
    if case.startswith("image_blend"):
        return image_blend([outputs[u] for u in pair])
    merged_states = []
    for u in pair:
        state, bias_map, site = copies[u]
        merged_states.append({**state, f"{site}.bias_map": bias_map} if bias_map is not None else state)
    merged = merge_copies(case.rsplit("_", 1)[0], merged_states, torch.Generator().manual_seed(0),
                          num_groups=int(model.vae.config.norm_num_groups))
    site = copies[0][2]
    bias_map = merged.pop(f"{site}.bias_map", None)
    return batched.decode(decoder_from_tensors(model.vae.config, merged, bias_map, site), latents)


def fitted_null(fit: np.ndarray) -> CodeNull:
    centre = np.median(fit, axis=0)
    return CodeNull(centre, inverse_power(np.cov((fit - centre).T), -0.5))  # the covariance's square root


def measure(checkpoint: str, args) -> dict:
    model = load_fingerprint_model(shipped_checkpoint(checkpoint))
    null = (fitted_null(procedural_unmarked_logits(model, 0, args.fit)) if args.refit
            else code_null(model.extractor, "soft_code_null"))
    test = procedural_unmarked_logits(model, TEST_SEED_OFFSET + 900, args.images)
    row = {"checkpoint": checkpoint, "method": model.method,
           "unmarked_fpr1e-3": unmarked_spread(test, soft_weights(model.extractor, test), null, args.registries,
                                               args.seed),
           "cases": {}}
    codes = np.random.default_rng(args.seed).integers(0, 2, (1000, model.fingerprint_bits)).astype(np.uint8)
    for case, (logits, truth) in case_logits(model, codes, args.users, args.per_user, args.seed).items():
        tails = Tails(logits, soft_weights(model.extractor, logits))
        row["cases"][case] = {}
        for rule in RULES:
            accused, who = decide(rule, logits, tails, codes, null, 1e-6)
            if rule == "soft + code null":  # what the library decides, the same rule
                shipped = identify_logits(logits, CodeIndex.from_bits([str(i) for i in range(len(codes))], codes),
                                          1e-6, "soft_code_null", null)
                assert [r["accused"] for r in shipped] == accused.tolist(), "library and script disagree"
            right = np.array([a and w in t for a, w, t in zip(accused, who, truth, strict=True)])
            row["cases"][case][rule] = {"attributed": float(right.mean()), "wrong": int((accused & ~right).sum())}
    return row


def main() -> None:
    parser = common_parser(__doc__.splitlines()[0])
    parser.add_argument("--refit", action="store_true", help="fit the null here instead of using the shipped one")
    args = parser.parse_args()
    check_counts(args, min_users=2)  # the 2-party cases pair the copies
    started = time.time()
    print("| checkpoint | rule | unmarked accused at 1e-3: mean / std / max (bound 10) | "
          + " | ".join(CASES) + " |\n|---|---|---|" + "---|" * len(CASES))
    for checkpoint in args.checkpoints:
        row = measure(checkpoint, args)
        for rule in RULES:
            s = row["unmarked_fpr1e-3"][rule]
            cells = [f"{c[rule]['attributed']:.3f}" + (f" ({c[rule]['wrong']} wrong)" if c[rule]["wrong"] else "")
                     for c in row["cases"].values()]
            print(f"| {row['method']} | {rule} | {s['mean']:.2f} / {s['std']:.2f} / {s['max']} | "
                  + " | ".join(cells) + " |", flush=True)
        append_jsonl(RESULTS, {"date": time.strftime("%Y-%m-%d"), **vars(args), **row})
    print(f"{time.time() - started:.0f} s")


if __name__ == "__main__":
    exit_on_user_error(main)
