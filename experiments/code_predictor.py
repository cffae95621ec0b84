"""Can a code's read be predicted without decoding? (issues 11 and 14)

``task=issue`` screens a pnm code by decoding 64 probe images with the code's decoder and reading
them (``distributor/screening.py``): cheap on the tiny VAE, about 1091 s a copy at SD's size
(``experiments/results/bench_issue_sd_screened.md``), which is what keeps a screened copy from
being 10^4x cheaper than a stable_signature copy. How well a copy reads is set by its code
(``experiments/results/code_screening.md``: probe and held-out reads correlate 0.98), so a model
fitted once per checkpoint might predict it from the code alone, for microseconds a draw.

This reads ``--train-codes`` random codes on the probe (their bit accuracy and PSNR are the
targets), fits ridge regressions (alpha by 5-fold cross-validation) on three feature sets:

- ``code``: the code's 48 signs;
- ``code+pairs``: the signs and every product of two;
- ``modulation``: the values the mapping network makes of the code (every GroupNorm scale and
  shift, every conv input-channel scale: what the copy's weights change by);

and then scores ``--codes`` other codes as ``experiments/screen_policy.py`` does (probe read,
held-out read of ``--images`` images, soft attribution among ``--registry`` users at fpr times
the screen's pass rate) under each screen at the same pass rate: the probe screen with the
checkpoint's recorded floors, a predicted screen per feature set (the PSNR floor on the predicted
PSNR, the bit threshold set on the training codes so that as many of them pass as pass the probe
screen), and two-stage screens (the prediction first, the probe only for codes it keeps: fewer
probe reads a copy).

    python experiments/code_predictor.py --train-codes 1500 --codes 400

Prints markdown tables; the run is appended to ``results/code_predictor.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import scipy.stats
import torch
from screen_policy import (
    cached_read_codes,
    check_setting_arguments,
    load_cached,
    save_cached,
    score_kept,
    setting,
    setting_arguments,
)

from fingerprint_lm.distributor.read_predictor import bit_threshold, cross_validated_alpha, pair_features, ridge
from fingerprint_lm.distributor.screening import ProbeReader, logits_of
from fingerprint_lm.errors import ConfigError, check_float, check_int, exit_on_user_error
from fingerprint_lm.metrics.quality import psnr
from fingerprint_lm.storage import append_jsonl

RESULTS = Path(__file__).resolve().parent / "results" / "code_predictor.jsonl"
ALPHAS = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0)
FEATURES = ("code", "code+pairs", "modulation", "logit model")


def code_features(codes: np.ndarray, pairs: bool) -> np.ndarray:
    return pair_features(codes) if pairs else 2.0 * codes.astype(np.float64) - 1.0


@torch.no_grad()
def modulation_features(model, codes: np.ndarray) -> np.ndarray:
    """Every value the mapping network makes of each code, flattened in a fixed order."""
    modulation = model.pnm.modulation(torch.as_tensor(codes).long())
    return torch.cat([modulation[site][name].reshape(len(codes), -1).double()
                      for site in sorted(modulation) for name in sorted(modulation[site])], dim=1).numpy()


def features(model, codes: np.ndarray, kind: str) -> np.ndarray:
    return modulation_features(model, codes) if kind == "modulation" else code_features(codes, kind == "code+pairs")


class Ridge:
    """Ridge regression on standardised features (the mapping network's values differ in scale),
    its penalty chosen by 5-fold cross-validation over :data:`ALPHAS` (``y`` one target per code, or
    several sharing the penalty); ``distributor/read_predictor.py``'s fit on scaled inputs."""

    def __init__(self, x: np.ndarray, y: np.ndarray, seed: int) -> None:
        self.mean, self.std = x.mean(axis=0), x.std(axis=0) + 1e-12
        z = (x - self.mean) / self.std
        self.alpha, _ = cross_validated_alpha(z, y, seed, ALPHAS)
        self.weight, self.offset = ridge(z, y, self.alpha)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return (x - self.mean) / self.std @ self.weight + self.offset


@torch.no_grad()
def probe_reads(reader, codes: np.ndarray) -> dict[str, np.ndarray]:
    """Per code, as ``ProbeReader`` reads it: bit accuracy and PSNR on the probe, and the mean and
    standard deviation over the probe images of each bit's logit."""
    out = {"acc": [], "psnr": [], "logit_mean": [], "logit_std": []}
    for code in codes:
        decoded = reader.decode(code)
        logits = logits_of(reader.model, decoded)
        for key, value in (("acc", ((logits > 0) == code.astype(bool)).mean()),
                           ("psnr", psnr(decoded, reader.base).mean().item()),
                           ("logit_mean", logits.mean(axis=0)), ("logit_std", logits.std(axis=0))):
            out[key].append(value)
    return {key: np.array(value) for key, value in out.items()}


class LogitModel:
    """Each bit's mean probe logit as a ridge regression on the code's signs and their pairwise
    products; the predicted bit accuracy of a code is the mean over bits of ``Phi(margin / std)``,
    the margin being the predicted logit times the bit's sign and ``std`` each bit's spread over
    probe images (pooled over the training codes). A bit reads right when its logit's sign is the
    bit's, so the margin ``s_j * l_j(s)`` is what carries a code's accuracy."""

    def __init__(self, codes: np.ndarray, reads: dict[str, np.ndarray], seed: int) -> None:
        self.logits = Ridge(code_features(codes, pairs=True), reads["logit_mean"], seed)
        self.alpha = self.logits.alpha
        self.std = reads["logit_std"].mean(axis=0)

    def __call__(self, codes: np.ndarray) -> np.ndarray:
        margins = (2.0 * codes - 1.0) * self.logits(code_features(codes, pairs=True))
        return scipy.stats.norm.cdf(margins / self.std).mean(axis=1)


def predicted_screen(train_pred: np.ndarray, test_pred: np.ndarray, min_psnr: float, rate: float) -> np.ndarray:
    """Keep test codes whose predicted PSNR clears ``min_psnr`` and predicted bit accuracy clears the
    threshold that passes ``rate`` of the training codes (columns: accuracy, PSNR)."""
    threshold = bit_threshold(train_pred, rate, min_psnr)
    return (test_pred[:, 0] >= threshold) & (test_pred[:, 1] >= min_psnr)


def cached_reads(args: argparse.Namespace, context) -> tuple[np.ndarray, dict, dict]:
    """The training codes and their probe reads (on the first ``--fit-probe-images`` probe images),
    and the test codes' reads (``screen_policy.read_codes``), each from the ``--cache`` folder when
    it holds them for this run's settings (the training reads: at least as many codes), else read
    (and written there)."""
    folder = Path(args.cache) if args.cache else None
    train_key = json.dumps({k: getattr(args, k) for k in ("checkpoint", "seed", "fit_probe_images")})
    train_path = folder / f"train_{args.fit_probe_images}_images.npz" if folder else None
    stored = load_cached(train_path, train_key) if folder else None
    if stored is not None and len(stored["codes"]) >= args.train_codes:
        train_reads = {k: v[:args.train_codes] for k, v in stored.items()}  # the first n of a larger draw: a draw of n
    else:
        codes = np.random.default_rng([args.seed, 9]).integers(
            0, 2, (args.train_codes, context.model.fingerprint_bits), dtype=np.uint8)
        reader = (context.reader if args.fit_probe_images == len(context.reader.images)
                  else ProbeReader(context.model, args.fit_probe_images))
        train_reads = {"codes": codes, **probe_reads(reader, codes)}
        if folder:
            save_cached(train_path, train_key, train_reads)
    test_reads = cached_read_codes(context, args, folder / "test.npz" if folder else None)
    train = train_reads.pop("codes")
    return train, train_reads, test_reads


def fitted_predictions(model, kind: str, train: np.ndarray, train_reads: dict, test: np.ndarray,
                       seed: int) -> tuple[np.ndarray, np.ndarray, dict]:
    """Predicted (bit accuracy, PSNR) of the training and test codes from ``kind``'s features; the
    logit model predicts bit accuracy only, its PSNR column is the modulation ridge's."""
    kinds = ("modulation", "modulation") if kind == "logit model" else (kind, kind)
    data = {k: (features(model, train, k), features(model, test, k)) for k in set(kinds)}
    psnr_fit = Ridge(data[kinds[1]][0], train_reads["psnr"], seed)
    if kind == "logit model":
        acc_fit = LogitModel(train, train_reads, seed)
        acc_train, acc_test = acc_fit(train), acc_fit(test)
    else:
        acc_fit = Ridge(data[kinds[0]][0], train_reads["acc"], seed)
        acc_train, acc_test = acc_fit(data[kinds[0]][0]), acc_fit(data[kinds[0]][1])
    width = code_features(train[:1], True).shape[1] if kind == "logit model" else data[kind][0].shape[1]
    return (np.stack([acc_train, psnr_fit(data[kinds[1]][0])], axis=1),
            np.stack([acc_test, psnr_fit(data[kinds[1]][1])], axis=1),
            {"alpha_acc": acc_fit.alpha, "alpha_psnr": psnr_fit.alpha, "features": int(width)})


def run(args: argparse.Namespace) -> dict:
    started = time.time()
    context = setting(args)
    model, floors = context.model, context.model.meta.get("issue_screen") or {}
    min_acc, min_psnr = float(floors.get("min_probe_bit_acc", 0.0)), float(floors.get("min_probe_psnr", 0.0))
    train, train_reads, reads = cached_reads(args, context)
    probe_kept = (reads["probe_acc"] >= min_acc) & (reads["probe_psnr"] >= min_psnr)
    train_rate = float(((train_reads["acc"] >= min_acc) & (train_reads["psnr"] >= min_psnr)).mean())
    fits, screens = {}, {"none": np.ones(len(context.codes), bool), "probe (recorded floors)": probe_kept}
    for kind in FEATURES:
        train_pred, test_pred, fits[kind] = fitted_predictions(model, kind, train, train_reads, context.codes,
                                                               args.seed)
        fits[kind].update({"r_probe_acc": float(np.corrcoef(test_pred[:, 0], reads["probe_acc"])[0, 1]),
                           "r_held_out_acc": float(np.corrcoef(test_pred[:, 0], reads["bit_acc"])[0, 1]),
                           "r_probe_psnr": float(np.corrcoef(test_pred[:, 1], reads["probe_psnr"])[0, 1])})
        screens[f"predicted ({kind})"] = predicted_screen(train_pred, test_pred, min_psnr, train_rate)
        for prefilter in args.prefilter:
            first = predicted_screen(train_pred, test_pred, min_psnr, prefilter)
            screens[f"{kind} keeps {prefilter:.0%}, then probe"] = first & probe_kept
            both = (first & probe_kept).sum()  # none kept: no figure (nan)
            fits[kind][f"probe_reads_per_copy_after_{prefilter}"] = float(first.sum() / both) if both else float("nan")
    rows = {name: score_kept(reads, kept, args.fpr) for name, kept in screens.items() if kept.any()}
    return {"train_rate": train_rate, "fits": fits, "rows": rows, "seconds": round(time.time() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    setting_arguments(parser, codes=400, images=64, seed=61)
    parser.add_argument("--train-codes", type=int, default=1500)
    parser.add_argument("--prefilter", type=float, nargs="*", default=[0.6, 0.8])
    parser.add_argument("--fit-probe-images", type=int, default=64,
                        help="probe images the training codes are read on (the test codes: always the screen's 64)")
    parser.add_argument("--cache", default=None, help="a folder for the reads, reused when their settings match")
    args = parser.parse_args()
    check_int("--train-codes", args.train_codes, 10)
    if check_int("--fit-probe-images", args.fit_probe_images) > 64:
        raise ConfigError(f"--fit-probe-images must be <= 64 (the screen's probe), got {args.fit_probe_images}")
    check_setting_arguments(args)
    for value in args.prefilter:
        check_float("--prefilter", value, above=0.0, maximum=1.0)
    result = run(args)
    print(f"{args.train_codes} training codes (probe pass rate {result['train_rate']:.3f}), {args.codes} test codes "
          f"of {args.checkpoint}, {args.images} held-out images each (8-bit), registry {args.registry}\n")
    print("| features | n | alpha (acc / PSNR) | r with probe acc | r with held-out acc | r with probe PSNR | "
          "probe reads a copy after the prefilter |\n|---|---|---|---|---|---|---|")
    for kind, fit in result["fits"].items():
        after = " / ".join(f"{fit[f'probe_reads_per_copy_after_{p}']:.2f} ({p:.0%})" for p in args.prefilter)
        print(f"| {kind} | {fit['features']} | {fit['alpha_acc']:g} / {fit['alpha_psnr']:g} | {fit['r_probe_acc']:.3f} "
              f"| {fit['r_held_out_acc']:.3f} | {fit['r_probe_psnr']:.3f} | {after} |")
    print("\n| screen | codes kept | pass rate | attributed (p / rate) | worst code | bit_acc | PSNR mean | "
          "worst copy | copies >= 30 dB |\n|---|---|---|---|---|---|---|---|---|")
    for name, r in result["rows"].items():
        print(f"| {name} | {r['codes_kept']} | {r['pass_rate']:.3f} | {r['attributed']:.4f} | {r['worst_code']:.3f} | "
              f"{r['bit_acc']:.4f} | {r['mean_psnr']:.2f} | {r['min_psnr_copy']:.2f} | {r['copies_at_30db']:.0%} |")
    print(f"\n{result['seconds']:.0f} s")
    append_jsonl(RESULTS, {"date": time.strftime("%Y-%m-%d"), **vars(args), **result})


if __name__ == "__main__":
    exit_on_user_error(main)
