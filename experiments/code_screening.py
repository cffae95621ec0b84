"""Screening codes at issue time (issue 11 probe): does a probe read predict how well a copy reads?

One user's accuracy depends on their code (``per_user_spread.py``: 0.888-0.974 over 32 users of
the shipped pnm checkpoint), and the users whose copies read worst are where clean attribution
fails. A distributor could decode a few probe images with a candidate code's copy before issuing
it and draw another code when the copy reads poorly: no retraining, a few decoder passes a copy.
This measures whether that would work, and what it does to the false-accusation bound:

- ``--candidates`` random codes each get a copy (ACT all); each copy decodes ``--probe`` probe
  images and, separately, ``--images`` held-out images (other seeds, disjoint content);
- per code: bit accuracy on the probe and on the held-out images, and the share of held-out images
  soft attribution names the right user for (fpr 1e-6 among ``--registry`` codes, the candidates
  first), then the same figures for the codes whose probe accuracy is in the top ``--keep``;
- the null: the soft p-values (uncorrected) of the candidates' codes as innocents, on the other
  users' held-out images and on unmarked (base decoder) images. Attribution's bound assumes an
  innocent's code is a fair coin independent of the image; a screened code is not a uniform draw,
  so the share of innocent pairs at p <= 1e-3 is compared for kept and for rejected codes;
- ``--null-images N``: a registry of ``--registry`` screened codes (drawn until that many pass the
  probe threshold the candidates set) and one of uniform codes, each against N unmarked images:
  images accused at fpr 1e-6, and the share of the N x registry pairs at p <= 1e-3, 1e-4, 1e-5.

    python experiments/code_screening.py --candidates 64 --probe 64 --images 256
    python experiments/code_screening.py --candidates 64 --probe 64 --images 256 --null-images 10000

Prints a markdown table; the row is appended to ``results/code_screening.jsonl``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from fingerprint_lm.distributor.copies import decoder_from_tensors
from fingerprint_lm.distributor.generation import held_out_images
from fingerprint_lm.distributor.screening import PROBE_SEED, read_logits
from fingerprint_lm.errors import ConfigError, check_int, check_probability, exit_on_user_error
from fingerprint_lm.methods.base import personal_tensors
from fingerprint_lm.models.checkpoint import load_fingerprint_model, shipped_checkpoint
from fingerprint_lm.registry.index import CodeIndex
from fingerprint_lm.registry.soft import quantized_weights, soft_identify, soft_tail
from fingerprint_lm.storage import append_jsonl

RESULTS = Path(__file__).resolve().parent / "results" / "code_screening.jsonl"
EVAL_SEED = 5  # the held-out images the other pnm probes read (PROBE_SEED: the distributor's probe, other content)


def p_values(logits: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """[images, codes]: each code's uncorrected soft p-value on each image."""
    weights = quantized_weights(logits)
    return soft_tail(weights, weights @ codes.T.astype(np.int64))


@torch.no_grad()
def screened_null(model, threshold: float, n_probe: int, n_registry: int, n_images: int, fpr: float,
                  seed: int) -> dict:
    """Unmarked images against a registry of codes that pass the probe and one of uniform codes."""
    resolution = model.meta.get("resolution", 32)
    probe = held_out_images(resolution, n_probe, PROBE_SEED)
    rng = np.random.default_rng(seed + 1)
    kept, draws = [], 0
    while len(kept) < n_registry:
        code = rng.integers(0, 2, model.fingerprint_bits, dtype=np.uint8)
        draws += 1
        state = personal_tensors(model, code, "all", int(rng.integers(2**31)))
        decoder = decoder_from_tensors(model.vae.config, *state)
        if ((read_logits(model, decoder, probe) > 0) == code).mean() >= threshold:
            kept.append(code)
    uniform = np.random.default_rng(seed + 2).integers(0, 2, (n_registry, model.fingerprint_bits), dtype=np.uint8)
    logits = read_logits(model, model.unmarked_vae, held_out_images(resolution, n_images, 1234))
    out = {"null_images": n_images, "screened_draws": draws}
    for name, codes in (("screened", np.stack(kept)), ("uniform", uniform)):
        index = CodeIndex.from_bits([f"u{i}" for i in range(n_registry)], codes)
        p = p_values(logits, codes)
        out[name] = {"accused": sum(r["accused"] for r in soft_identify(logits, index, fpr=fpr)),
                     **{f"p<={t:g}": float((p <= t).mean()) for t in (1e-3, 1e-4, 1e-5)}}
    return out


@torch.no_grad()
def screen(candidates: int, n_probe: int, n_images: int, registry: int, keep: float, fpr: float, seed: int,
           null_images: int = 0) -> dict:
    model = load_fingerprint_model(shipped_checkpoint("embedded_pnm"))
    resolution = model.meta.get("resolution", 32)
    probe, images = held_out_images(resolution, n_probe, PROBE_SEED), held_out_images(resolution, n_images, EVAL_SEED)
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 2, (registry, model.fingerprint_bits), dtype=np.uint8)
    index = CodeIndex.from_bits([f"user{i}" for i in range(registry)], codes)
    probe_acc, held_acc, attributed, held_logits = [], [], [], []
    for user in range(candidates):
        decoder = decoder_from_tensors(model.vae.config, *personal_tensors(model, codes[user], "all",
                                                                           int(rng.integers(2**31))))
        probe_acc.append(float(((read_logits(model, decoder, probe) > 0) == codes[user]).mean()))
        logits = read_logits(model, decoder, images)
        held_logits.append(logits)
        held_acc.append(float(((logits > 0) == codes[user]).mean()))
        found = soft_identify(logits, index, fpr=fpr)
        attributed.append(float(np.mean([r["accused"] and r["user_id"] == f"user{user}" for r in found])))
    probe_acc, held_acc, attributed = map(np.array, (probe_acc, held_acc, attributed))
    kept = probe_acc >= np.quantile(probe_acc, 1 - keep)
    # the null: every candidate's code as an innocent on the other candidates' images (a thinned
    # sample of them, own pairs masked) and on unmarked images
    step = max(1, n_images // 16)
    marked_p = p_values(np.concatenate([logits[::step] for logits in held_logits]), codes[:candidates])
    owner = np.repeat(np.arange(candidates), len(marked_p) // candidates)
    innocent = np.arange(candidates)[None, :] != owner[:, None]
    unmarked_p = p_values(read_logits(model, model.unmarked_vae, images), codes[:candidates])
    row = {"candidates": candidates, "probe_images": n_probe, "images": n_images, "registry": registry, "keep": keep,
           "fpr": fpr, "seed": seed, "probe_vs_held_corr": float(np.corrcoef(probe_acc, held_acc)[0, 1])}
    for name, chosen in (("all", np.ones(candidates, dtype=bool)), ("kept", kept), ("rejected", ~kept)):
        row[name] = {
            "codes": int(chosen.sum()), "held_bit_acc": float(held_acc[chosen].mean()),
            "held_bit_acc_min": float(held_acc[chosen].min()), "attribution": float(attributed[chosen].mean()),
            "innocent_p<=1e-3": float((marked_p[:, chosen][innocent[:, chosen]] <= 1e-3).mean()),
            "unmarked_p<=1e-3": float((unmarked_p[:, chosen] <= 1e-3).mean()),
        }
    row["probe_threshold"] = float(probe_acc[kept].min())
    if null_images:
        row["null"] = screened_null(model, row["probe_threshold"], n_probe, registry, null_images, fpr, seed)
    return row


def table(row: dict) -> str:
    lines = [f"{row['candidates']} candidate codes, probe {row['probe_images']} images, held out {row['images']}, "
             f"registry {row['registry']}, fpr {row['fpr']:g}; correlation of probe and held-out bit accuracy "
             f"{row['probe_vs_held_corr']:.2f}", "",
             "| codes | n | held-out bit_acc: mean / min | clean attribution | innocent pairs p <= 1e-3: "
             "marked / unmarked images |", "|---|---|---|---|---|"]
    for name in ("all", "kept", "rejected"):
        r = row[name]
        label = {"all": "every candidate", "kept": f"top {row['keep']:.0%} by probe", "rejected": "the rest"}[name]
        lines.append(f"| {label} | {r['codes']} | {r['held_bit_acc']:.3f} / {r['held_bit_acc_min']:.3f} | "
                     f"{r['attribution']:.3f} | {r['innocent_p<=1e-3']:.5f} / {r['unmarked_p<=1e-3']:.5f} |")
    if "null" in row:
        null = row["null"]
        lines += ["", f"{null['null_images']} unmarked images against {row['registry']} registered codes "
                  f"(screened: probe bit_acc >= {row['probe_threshold']:.3f}, {null['screened_draws']} draws)", "",
                  f"| registry | accused at fpr {row['fpr']:g} | pairs p <= 1e-3 | p <= 1e-4 | p <= 1e-5 |",
                  "|---|---|---|---|---|"]
        for name in ("screened", "uniform"):
            r = null[name]
            rates = " | ".join(f"{r[key]:.2e}" for key in ("p<=0.001", "p<=0.0001", "p<=1e-05"))
            lines.append(f"| {name} | {r['accused']} | {rates} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", type=int, default=64)
    parser.add_argument("--probe", type=int, default=64)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--registry", type=int, default=1000)
    parser.add_argument("--keep", type=float, default=0.75)
    parser.add_argument("--fpr", type=float, default=1e-6)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--null-images", type=int, default=0, help="> 0: the screened registry's null test")
    args = parser.parse_args()
    for name in ("candidates", "probe", "images", "registry"):
        check_int(f"--{name}", getattr(args, name))
    if args.candidates < 4 or args.candidates > args.registry:
        raise ConfigError(f"--candidates must be between 4 and --registry ({args.registry}), got {args.candidates}")
    check_int("--null-images", args.null_images, 0)
    check_probability("--keep", args.keep)
    start = time.perf_counter()
    row = screen(args.candidates, args.probe, args.images, args.registry, args.keep, args.fpr, args.seed,
                 args.null_images)
    row.update({"date": time.strftime("%Y-%m-%d"), "seconds": round(time.perf_counter() - start, 1),
                "threads": torch.get_num_threads()})
    print(table(row))
    print(f"{row['seconds']:.0f} s")
    append_jsonl(RESULTS, row)


if __name__ == "__main__":
    exit_on_user_error(main)
