"""Screening codes without decoding: a code's probe read predicted from the code alone.

The probe screen (:mod:`fingerprint_lm.distributor.screening`) decodes 64 probe images for each
drawn code: cheap on the tiny VAE, about 2400 s a copy at SD's size on a CPU at the shipped
screen's 12 draws (an estimate, ``BENCHMARKS.md`` of 2026-12-08), about
half of what a stable_signature copy costs. How well a pnm copy reads is nearly a quadratic function of
its code's signs: a bit reads right when its logit's sign is the bit's, and the margin
``s_j * l_j(s)`` of a logit roughly linear in the signs is a sum of products ``s_j * s_k``. A
ridge regression on the signs and their pairwise products, fitted once per checkpoint on a few
thousand codes' probe reads, predicts them well enough to screen on (the shipped checkpoint's
fit, its reader refitted on 16384 images: cross-validated R^2 0.49 for bit accuracy, 0.75 for PSNR;
0.78 and 0.74 in an earlier fit), and a screen on its predictions attributes as the probe
screen does within noise (``experiments/results/default_condition.md``: 0.9909 against 0.9899 on
average over five registries; ``predicted_screen_policy.md``: 0.9864 against 0.9872 over 2000
codes). At issue time it costs a matrix product per draw; ``screen_by=auto``, the default, takes it
wherever a checkpoint records one (``distributor/issue_screens.py``).

A predicted screen keeps a code when its predicted PSNR clears the probe's PSNR floor and its
predicted bit accuracy clears the threshold that passes as many of the fit's codes as the probe
floors pass; its pass rate, which attribution's bound divides p-values by, is measured on many
fresh codes (no decoding, so 10^5 of them cost a second).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from fingerprint_lm.distributor.screening import ProbeReader, clears
from fingerprint_lm.errors import CheckpointError, ConfigError, RegistryError, check_float, check_int

ALPHAS = (1e-3, 1e-2, 1e-1, 1.0, 10.0)  # the ridge penalties cross-validation chooses from (x codes)
FOLDS = 5
RATE_CODES = 100_000  # fresh codes the predicted screen's pass rate is measured on


def pair_features(codes: np.ndarray) -> np.ndarray:
    """Each code's signs (``2b - 1``) and every product of two of them: ``[n, k + k(k-1)/2]``.
    For uniform codes every feature has mean 0 and variance 1, so none needs scaling."""
    signs = 2.0 * np.asarray(codes, dtype=np.float64).reshape(len(codes), -1) - 1.0
    upper = np.triu_indices(signs.shape[1], 1)
    return np.concatenate([signs, signs[:, upper[0]] * signs[:, upper[1]]], axis=1)


def ridge(x: np.ndarray, y: np.ndarray, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Ridge weights and offset for targets ``y`` (``[n]`` or ``[n, t]``), penalty ``alpha x n``."""
    offset = y.mean(axis=0)
    if x.shape[1] <= x.shape[0]:
        weight = np.linalg.solve(x.T @ x + alpha * len(x) * np.eye(x.shape[1]), x.T @ (y - offset))
    else:  # the dual form: fewer codes than features
        weight = x.T @ np.linalg.solve(x @ x.T + alpha * len(x) * np.eye(len(x)), y - offset)
    return weight, offset


def cross_validated_alpha(x: np.ndarray, y: np.ndarray, seed: int,
                          alphas: tuple[float, ...] = ALPHAS) -> tuple[float, float]:
    """The penalty of ``alphas`` with the least 5-fold mean squared error, and that error."""
    folds = np.random.default_rng(seed).permutation(len(x)) % FOLDS
    errors = []
    for alpha in alphas:
        fold_errors = []
        for k in range(FOLDS):
            weight, offset = ridge(x[folds != k], y[folds != k], alpha)
            fold_errors.append(np.mean((x[folds == k] @ weight + offset - y[folds == k]) ** 2))
        errors.append(float(np.mean(fold_errors)))
    best = int(np.argmin(errors))
    return alphas[best], errors[best]


@dataclass
class ReadPredictor:
    """Predicted probe read ``(bit accuracy, PSNR)`` of codes: ``pair_features(codes) @ weight + offset``."""

    weight: np.ndarray  # [features, 2]
    offset: np.ndarray  # [2]

    def __call__(self, codes: np.ndarray) -> np.ndarray:
        return pair_features(codes) @ self.weight + self.offset

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"weight": torch.from_numpy(np.ascontiguousarray(self.weight)),
                "offset": torch.from_numpy(np.ascontiguousarray(self.offset))}

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> ReadPredictor:
        return cls(state["weight"].double().numpy(), state["offset"].double().numpy())


def fit_read_predictor(reader: ProbeReader, floors: dict[str, Any], codes: int = 3000,
                       seed: int = 9) -> tuple[ReadPredictor, dict[str, Any]]:
    """Read ``codes`` random codes (``default_rng(seed)``) on the probe, fit the predictor on them
    (one penalty per target by cross-validation) and set the predicted screen's thresholds from the
    probe ``floors`` (``min_probe_bit_acc``, ``min_probe_psnr``: the ``issue_screen`` record): the
    record's ``predictor`` entry, with the cross-validated correlations and the pass rate on
    :data:`RATE_CODES` fresh codes."""
    check_int("predictor codes", codes, 2 * FOLDS)
    rng = np.random.default_rng(seed)
    drawn = rng.integers(0, 2, (codes, reader.model.fingerprint_bits), dtype=np.uint8)
    reads = np.array([reader(code) for code in tqdm(drawn, desc="probe reads", unit="code", leave=False)])
    x = pair_features(drawn)
    columns, record = [], {"fit_codes": int(codes), "fit_seed": int(seed)}
    for column, name in enumerate(("bit_acc", "psnr")):
        alpha, error = cross_validated_alpha(x, reads[:, column], seed)
        columns.append(ridge(x, reads[:, column], alpha))
        record[f"alpha_{name}"] = alpha
        record[f"cv_r2_{name}"] = round(1.0 - error / float(reads[:, column].var()), 4)
    predictor = ReadPredictor(np.stack([w for w, _ in columns], axis=1), np.array([o for _, o in columns]))
    min_psnr = floors.get("min_probe_psnr")
    passing = np.array([clears(a, q, floors.get("min_probe_bit_acc"), min_psnr) for a, q in reads])
    if not passing.any():
        raise ConfigError(f"none of the {codes} codes' probe reads clears the floors {floors}: no screen to predict")
    # The thresholds are set on fresh codes' predictions (the fit's own are overfitted, hence wider):
    # the predicted PSNR floor is the probe's, the bit threshold passes the probe's share of codes.
    threshold = bit_threshold(fresh_predictions(predictor, seed + 1), float(passing.mean()), min_psnr)
    record.update({"min_predicted_bit_acc": round(threshold, 6), "min_predicted_psnr": min_psnr,
                   "probe_pass_rate_on_fit_codes": round(float(passing.mean()), 4)})
    record.update(predicted_pass_rate(predictor, record, seed + 2))
    if record["pass_rate"] == 0:
        raise ConfigError(f"the predicted screen fitted to {floors} keeps no fresh code: no screen to record")
    return predictor, record


def with_read_predictor(model, floors: dict[str, Any], codes: int, seed: int = 9,
                        device: str | torch.device = "cpu") -> dict[str, Any]:
    """``floors`` (a checkpoint's ``issue_screen`` record) with a read predictor fitted to them on
    ``codes`` random codes' probe reads (:func:`fit_read_predictor`) as its ``predictor`` entry; the
    predictor's weights are set on ``model`` (``issue_predictor``, saved in ``fingerprint.safetensors``).
    The probe reads (the fit's cost: ``codes`` decodes of the probe images) run on ``device``."""
    if floors.get("min_probe_bit_acc") is None:
        raise ConfigError("a read predictor follows the probe screen's floors, and none are recorded: fit them first")
    reader = ProbeReader(model, int(floors.get("probe_images", 64)), device)
    predictor, record = fit_read_predictor(reader, floors, codes, seed)
    model.issue_predictor = predictor.state_dict()
    return {**floors, "predictor": record}


def check_predictor_codes(name: str, codes: int) -> int:
    """0 (no predictor) or enough codes for the cross-validation's folds."""
    return 0 if check_int(name, codes, 0) == 0 else check_int(name, codes, 2 * FOLDS)


def bit_threshold(predicted: np.ndarray, rate: float, min_psnr: float | None) -> float:
    """The predicted bit accuracy that keeps ``rate`` of the codes whose ``predicted`` reads
    (``[n, 2]``: bit accuracy, PSNR) clear ``min_psnr``; ``inf`` when none clears it."""
    quality_ok = predicted[:, 1] >= (-np.inf if min_psnr is None else min_psnr)
    if not quality_ok.any():
        return float("inf")
    share = min(rate / quality_ok.mean(), 1.0)
    return float(np.quantile(predicted[quality_ok, 0], 1.0 - share))


def fresh_predictions(predictor: ReadPredictor, seed: int, codes: int = RATE_CODES) -> np.ndarray:
    """Predicted reads ``[codes, 2]`` of fresh random codes (``default_rng(seed)``), in batches."""
    rng, out = np.random.default_rng(seed), []
    for start in range(0, codes, 10_000):
        out.append(predictor(rng.integers(0, 2, (min(10_000, codes - start), _bits(predictor)), dtype=np.uint8)))
    return np.concatenate(out)


def predicted_pass_rate(predictor: ReadPredictor, record: dict[str, Any], seed: int,
                        codes: int = RATE_CODES) -> dict[str, Any]:
    """The share of ``codes`` fresh random codes the predicted screen keeps, with its standard error."""
    rate = float(predicted_keeps_reads(fresh_predictions(predictor, seed, codes), record).mean())
    return {"pass_rate": rate, "pass_rate_codes": int(codes), "pass_rate_seed": int(seed),
            "pass_rate_stderr": round(float(np.sqrt(rate * (1.0 - rate) / codes)), 5)}


def _bits(predictor: ReadPredictor) -> int:
    """The code length whose ``k + k(k-1)/2`` pair features the predictor weighs."""
    features = predictor.weight.shape[0]
    return int(round((np.sqrt(8 * features + 1) - 1) / 2))


def predicted_keeps_reads(predicted: np.ndarray, record: dict[str, Any]) -> np.ndarray:
    """Which predicted reads ``[n, 2]`` the predicted screen of ``record`` (``issue_screen.predictor``) keeps."""
    min_psnr = record.get("min_predicted_psnr")
    return (predicted[:, 0] >= record["min_predicted_bit_acc"]) & (
        predicted[:, 1] >= (-np.inf if min_psnr is None else min_psnr))


def recorded_predictor(model) -> tuple[ReadPredictor, dict[str, Any]]:
    """The read predictor a checkpoint records (its weights and ``issue_screen.predictor``)."""
    record = (model.meta.get("issue_screen") or {}).get("predictor")
    if record is None or not model.issue_predictor:
        raise ConfigError("screen_by=predicted (distributor. or sweep.): the checkpoint records no read predictor "
                          "(training fits one when eval.issue_predictor_codes > 0; for a trained checkpoint: "
                          "python experiments/fit_issue_screen.py <checkpoint> --predictor)")
    bits = model.fingerprint_bits
    features = bits + bits * (bits - 1) // 2
    weight, offset = model.issue_predictor.get("weight"), model.issue_predictor.get("offset")
    if (weight is None or offset is None or tuple(weight.shape) != (features, 2) or tuple(offset.shape) != (2,)
            or "min_predicted_bit_acc" not in record):
        raise CheckpointError(f"the checkpoint's read predictor does not fit its {bits}-bit codes (weight "
                              f"{None if weight is None else tuple(weight.shape)}, expected ({features}, 2))")
    return ReadPredictor.from_state_dict(model.issue_predictor), record


class PredictedScreen:
    """A code drawer for :func:`~fingerprint_lm.distributor.copies.issue_copy`, as
    :class:`~fingerprint_lm.distributor.screening.CodeScreen` but on the checkpoint's predicted
    reads: nothing is decoded. After a draw, ``predicted_bit_acc``, ``predicted_psnr`` and
    ``draws`` say how the issued code is predicted to read and what it took."""

    def __init__(self, predictor: ReadPredictor, record: dict[str, Any], registry, max_draws: int = 1000) -> None:
        self.predictor, self.record, self.registry = predictor, record, registry
        check_float("min_predicted_bit_acc", record["min_predicted_bit_acc"], maximum=1.0)
        self.max_draws = check_int("max_draws", max_draws)
        self.predicted_bit_acc: float | None = None
        self.predicted_psnr: float | None = None
        self.draws = 0

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        for draws in range(1, self.max_draws + 1):
            code = self.registry.new_code(rng)
            predicted = self.predictor(code[None])
            if predicted_keeps_reads(predicted, self.record)[0]:
                self.predicted_bit_acc, self.predicted_psnr = (float(v) for v in predicted[0])
                self.draws = draws
                return code
        raise RegistryError(f"no code among {self.max_draws} draws is predicted to read >= "
                            f"{self.record['min_predicted_bit_acc']} of its bits and decode >= "
                            f"{self.record.get('min_predicted_psnr')} dB: set distributor.screen_by=probe "
                            "or distributor.screen_codes=false")
