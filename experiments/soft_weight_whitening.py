"""Which linear map of the extractor's logits should soft-decision attribution weigh? (issue 13)

``experiments/results/soft_calibration.md`` found that soft decoding keeps its false-accusation
bound on average over registries, but that with the carrier extractor one registry in 200 accused
191 of 10^4 unmarked images at fpr 1e-3 (pnm's whitened reader: 16 at most). Its note blamed an
uncentred extractor. This script tests that and the alternatives. It fits, on ``--fit`` unmarked
images from the training stream (base-decoder outputs), the logits' per-bit median ``m`` and
covariance ``S``, and compares the weights soft attribution could use:

- ``raw``: the logits (what ships);
- ``centred``: ``l - m``;
- ``zca (shipped)``: ``S^-1/2 (l - c)`` (full whitening, the ZCA map: the whitened vector nearest the
  raw one; ``c`` puts the whitened median at 0), what the carrier reader now fits
  (:func:`~fingerprint_lm.models.pooled_extractor.whitening_map`);
- ``zca shrunk 0.5``: the same with ``S`` shrunk half-way to its diagonal;
- ``gaussian LR``: ``S^-1 (l - m)``, the log-likelihood ratio's per-bit weights when the logits are
  a code-dependent mean plus Gaussian noise of covariance ``S``.

Any weights keep the soft p-value exact given the image (an innocent's code is a fair coin
independent of it), so each row reports: the per-registry spread of accusations of ``--images``
unmarked held-out images over ``--registries`` registries of 1000 codes at fpr 1e-3 (mean, std,
max; bound on the mean 10 per 10^4), the top eigenvalues of the logits' correlation, and, for
``--users`` copies x ``--per-user`` held-out images per attack case, the bit accuracy of the
weights' signs and the soft attribution rate among 1000 users at fpr 1e-6.

    python experiments/soft_weight_whitening.py --checkpoints embedded embedded_pnm

Prints a markdown table; rows are appended to ``results/soft_weight_whitening.jsonl``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from soft_attribution import attacked, issue_copies
from soft_calibration import calibrate, procedural_unmarked_logits

from fingerprint_lm.data.datamodule import TEST_SEED_OFFSET
from fingerprint_lm.distributor.generation import held_out_images
from fingerprint_lm.errors import check_int, exit_on_user_error
from fingerprint_lm.models import batched
from fingerprint_lm.models.checkpoint import load_fingerprint_model, shipped_checkpoint
from fingerprint_lm.models.pooled_extractor import whitening_map
from fingerprint_lm.registry.index import CodeIndex
from fingerprint_lm.registry.soft import soft_identify
from fingerprint_lm.storage import append_jsonl

RESULTS = Path(__file__).resolve().parent / "results" / "soft_weight_whitening.jsonl"
CASES = ("none_c1", "jpeg_q90", "gaussian_blur_s1", "brightness_1.5", "gaussian_noise_0.05", "crop_resize_0.5")


def inverse_power(matrix: np.ndarray, power: float) -> np.ndarray:
    values, vectors = np.linalg.eigh(matrix)
    return vectors @ np.diag(np.maximum(values, 1e-12 * values.max()) ** -power) @ vectors.T


def weightings(fit: np.ndarray) -> dict:
    """name -> function of logits ``[n, k]``, every map fitted on the unmarked ``fit`` logits."""
    centre = np.median(fit, axis=0)
    cov = np.cov((fit - centre).T)
    shrunk = 0.5 * cov + 0.5 * np.diag(np.diag(cov))
    maps = {"zca shrunk 0.5": inverse_power(shrunk, 0.5), "gaussian LR": inverse_power(cov, 1.0)}
    zca_centre, zca = (t.numpy() for t in whitening_map(torch.from_numpy(fit)))  # what the carrier reader fits
    return {"raw": lambda x: x, "centred": lambda x: x - centre, "zca (shipped)": lambda x: (x - zca_centre) @ zca.T,
            **{name: (lambda x, m=m: (x - centre) @ m.T) for name, m in maps.items()}}


@torch.no_grad()
def marked(model, users: int, per_user: int, seed: int) -> tuple[dict, np.ndarray, np.ndarray, CodeIndex]:
    """Per case, the logits of ``users`` copies' attacked outputs; the truth; the codes; their registry."""
    codes, index, outputs = issue_copies(model, users, 1000, held_out_images(32, per_user, seed=seed), seed)
    logits = {case: batched.extract(model.extractor,
                                    torch.cat([attacked(o, case, seed + u) for u, o in enumerate(outputs)])
                                    ).double().numpy() for case in CASES}
    return logits, np.repeat(np.arange(users), per_user), codes, index


def measure(checkpoint: str, args) -> list[dict]:
    model = load_fingerprint_model(shipped_checkpoint(checkpoint))
    fit = procedural_unmarked_logits(model, 0, args.fit)  # the training stream: what a method's fit would see
    test = procedural_unmarked_logits(model, TEST_SEED_OFFSET + 900, args.images)
    logits, truth, codes, index = marked(model, args.users, args.per_user, args.seed)
    rows = []
    for name, weigh in weightings(fit).items():
        weights = weigh(test)
        eigen = np.linalg.eigvalsh(np.corrcoef(weights.T))[::-1][:3]
        spread = calibrate(weights, 1000, args.registries, args.seed)["0.001"]
        row = {"checkpoint": checkpoint, "method": model.method, "weights": name,
               "corr_top_eigen": eigen.round(2).tolist(),
               "unmarked_fpr1e-3": {k: spread[k] for k in ("bound", "mean", "std", "max")}, "cases": {}}
        for case, values in logits.items():
            w = weigh(values)
            found = soft_identify(w, index, fpr=1e-6)
            right = np.mean([r["accused"] and r["user_id"] == index.user_ids[t]
                             for r, t in zip(found, truth, strict=True)])
            wrong = int(sum(r["accused"] and r["user_id"] != index.user_ids[t]
                            for r, t in zip(found, truth, strict=True)))
            row["cases"][case] = {"bit_acc": float(((w > 0) == codes[truth]).mean()),
                                  "attribution": float(right), "wrong": wrong}
        rows.append(row)
    return rows


def common_parser(description: str) -> argparse.ArgumentParser:
    """The arguments this script shares with ``soft_code_null.py`` (checked by :func:`check_counts`)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--checkpoints", nargs="+", default=["embedded", "embedded_pnm"])
    parser.add_argument("--fit", type=int, default=2048)
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--registries", type=int, default=100)
    parser.add_argument("--users", type=int, default=4)
    parser.add_argument("--per-user", type=int, default=128)
    parser.add_argument("--seed", type=int, default=5)
    return parser


def check_counts(args: argparse.Namespace, min_users: int = 1) -> None:
    for name in ("fit", "images", "registries", "users", "per_user"):
        check_int(f"--{name.replace('_', '-')}", getattr(args, name), min_users if name == "users" else 1)


def main() -> None:
    args = common_parser(__doc__.splitlines()[0]).parse_args()
    check_counts(args)
    started = time.time()
    print("| checkpoint | weights | corr. top 3 eigenvalues (of 48) "
          "| unmarked accused at 1e-3: mean / std / max (bound 10) | "
          + " | ".join(f"{c}: bit_acc / attributed" for c in CASES) + " |")
    print("|---|---|---|---|" + "---|" * len(CASES))
    for checkpoint in args.checkpoints:
        for row in measure(checkpoint, args):
            s = row["unmarked_fpr1e-3"]
            cells = [f"{c['bit_acc']:.3f} / {c['attribution']:.3f}" + (f" ({c['wrong']} wrong)" if c["wrong"] else "")
                     for c in row["cases"].values()]
            print(f"| {row['method']} | {row['weights']} | {', '.join(map(str, row['corr_top_eigen']))} | "
                  f"{s['mean']:.2f} / {s['std']:.2f} / {s['max']} | " + " | ".join(cells) + " |", flush=True)
            append_jsonl(RESULTS, {"date": time.strftime("%Y-%m-%d"), **vars(args), **row})
    print(f"{time.time() - started:.0f} s")


if __name__ == "__main__":
    exit_on_user_error(main)
