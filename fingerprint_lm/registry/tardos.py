"""Collusion-secure scoring with Tardos codes, in Škorić et al.'s symmetric form.

Codes. Tardos draws one bias ``p_i`` per bit position from the arcsine density
``f(p) = 1 / (pi sqrt(p (1 - p)))`` cut to ``[t, 1 - t]`` (sampled as ``p = sin^2(r)``, ``r``
uniform on ``[arcsin(sqrt(t)), pi/2 - arcsin(sqrt(t))]``), then every user's bit ``i`` is 1 with
probability ``p_i`` (:func:`arcsine_biases`, :func:`draw_tardos_codes`). The registry's uniform
random codes are the special case ``p_i = 1/2`` (biases optional).

Score (the symmetric accusation of Škorić, Katzenbeisser and Celik, 2008). For the colluders'
output bit ``y_i`` and a user's bit ``x_i``:

    g(1, 1) =  sqrt((1 - p) / p)    g(1, 0) = -sqrt(p / (1 - p))
    g(0, 0) =  sqrt(p / (1 - p))    g(0, 1) = -sqrt((1 - p) / p)

and ``S_u = sum_i g(y_i, x_ui)``. For an innocent user, whose bits are drawn independently of
``y``, every term has mean 0 and variance 1 whatever ``y`` is (:func:`tardos_scores` is tested
against these moments), and ``|g| <= M = sqrt((1 - t) / t)``.

Threshold. Bernstein's inequality for ``m`` such terms gives
``P[S_u >= z] <= exp(-z^2 / (2 (m + M z / 3)))``; with a Bonferroni correction over ``N`` users,
``z = a + sqrt(a^2 + 2 L m)``, ``a = L M / 3``, ``L = ln(N / fpr)`` accuses an innocent with
probability at most ``fpr`` (:func:`tardos_threshold`). For ``p = 1/2`` every term is +-1 and the
score is ``2 * matching bits - m``.

Several images of a suspect set vote per position: ``y_i`` is the sign of the pooled evidence
``mean(2 p_i - 1)``; positions without a majority are erased (they add nothing to any score, which
keeps the innocents' bound).
"""

from __future__ import annotations

import math

import numpy as np

from fingerprint_lm.errors import ConfigError, DataError, check_int, check_probability
from fingerprint_lm.registry.index import CodeIndex
from fingerprint_lm.registry.tracing import bit_evidence


def arcsine_biases(m: int, cutoff: float, rng: np.random.Generator) -> np.ndarray:
    """``m`` position biases from Tardos' arcsine density cut to ``[cutoff, 1 - cutoff]``."""
    check_int("code length", m)
    if not 0.0 < cutoff < 0.5:
        raise ConfigError(f"the bias cutoff must lie in (0, 0.5), got {cutoff}")
    low = math.asin(math.sqrt(cutoff))
    return np.sin(rng.uniform(low, math.pi / 2 - low, size=m)) ** 2


def draw_tardos_codes(n_users: int, biases: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``uint8 [n_users, m]`` codes: bit ``i`` of every user is 1 with probability ``biases[i]``."""
    check_int("number of users", n_users)
    return (rng.random((n_users, len(biases))) < np.asarray(biases)[None]).astype(np.uint8)


def pirate_bits(probs) -> np.ndarray:
    """The suspect set's vote per position: 1, 0, or -1 (erased: no majority)."""
    w = bit_evidence(probs)
    return np.where(w > 0, 1, np.where(w < 0, 0, -1)).astype(np.int8)


def tardos_scores(pirate: np.ndarray, codes: np.ndarray, biases: np.ndarray | None = None) -> np.ndarray:
    """Symmetric Tardos score of every code row ``[N, m]`` against the pirate bits ``[m]`` (1, 0,
    or -1 for an erased position); ``biases`` None means 1/2 everywhere."""
    y = np.asarray(pirate)
    codes = np.asarray(codes)
    if codes.ndim != 2 or codes.shape[1] != y.shape[0]:
        raise DataError(f"codes must have shape [N, {y.shape[0]}], got {codes.shape}")
    p = np.full(y.shape[0], 0.5) if biases is None else np.asarray(biases, dtype=np.float64)
    if p.shape != y.shape or np.any(p <= 0) or np.any(p >= 1):
        raise DataError(f"biases must be {y.shape[0]} values in (0, 1)")
    one, zero = np.sqrt((1 - p) / p), np.sqrt(p / (1 - p))
    # rows: the user's bit x; the term for y = 1 is (one if x else -zero), for y = 0 (-one if x else zero)
    agree_one = np.where(codes == 1, one, -zero)
    agree_zero = np.where(codes == 1, -one, zero)
    terms = np.where(y == 1, agree_one, np.where(y == 0, agree_zero, 0.0))
    return terms.sum(axis=1)


def _term_bound(cutoff: float) -> float:
    """``M``, the largest ``|g|`` for biases in ``[cutoff, 1 - cutoff]`` (1 for uniform codes)."""
    return 1.0 if cutoff >= 0.5 else math.sqrt((1 - cutoff) / cutoff)


def tardos_threshold(m: int, n_users: int, fpr: float, cutoff: float = 0.5) -> float:
    """Score above which a user is accused: Bernstein's bound with Bonferroni over ``n_users``
    (``cutoff`` 0.5: uniform codes, every term +-1)."""
    check_probability("fpr", fpr)
    check_int("code length", m)
    check_int("number of users", n_users)
    bound = _term_bound(cutoff)
    log_term = math.log(n_users / fpr)
    a = log_term * bound / 3.0
    return a + math.sqrt(a * a + 2.0 * log_term * m)


def tardos_trace(probs, index: CodeIndex, fpr: float = 1e-6, top: int = 10, biases: np.ndarray | None = None,
                 cutoff: float = 0.5) -> dict:
    """Rank the registry's users by symmetric Tardos score against a suspect set's soft outputs.

    Returns ``{"threshold", "erased", "suspects": [...]}`` with per suspect ``user_id``, ``score``,
    ``p_value_bound`` (Bernstein, times ``N``) and ``accused``; by decreasing score."""
    pirate = pirate_bits(probs)
    m, n = pirate.shape[0], len(index)
    threshold = tardos_threshold(m, max(n, 1), fpr, cutoff)
    if n == 0:
        return {"threshold": threshold, "erased": int((pirate < 0).sum()), "suspects": []}
    scores = tardos_scores(pirate, index.bits(), biases)
    bound = _term_bound(cutoff)
    keep = max(int(top), int((scores >= threshold).sum()))
    suspects = []
    for i in np.argsort(-scores, kind="stable")[:keep]:
        s = float(scores[i])
        p_bound = min(1.0, n * math.exp(-s * s / (2.0 * (m + bound * s / 3.0)))) if s > 0 else 1.0
        suspects.append({"user_id": index.user_ids[i], "score": s, "p_value_bound": p_bound,
                         "accused": bool(s >= threshold)})
    return {"threshold": threshold, "erased": int((pirate < 0).sum()), "suspects": suspects}
