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

Threshold. Given the pirate bits ``y``, an innocent user's terms are independent, each ``g(y_i, x)``
with ``x ~ Bernoulli(p_i)``, so Chernoff's bound holds exactly as stated for every ``lam > 0``:
``P[S_u >= z] <= exp(-lam z + K(lam))`` with ``K(lam) = sum_i log E[exp(lam g_i)]`` computed from
the biases. With a Bonferroni correction over ``N`` users, ``z = min_lam (K(lam) + L) / lam``,
``L = ln(N / fpr)``, accuses an innocent with probability at most ``fpr`` (:func:`tardos_threshold`,
minimised over a fixed grid of ``lam``: any ``lam`` gives a valid bound). It is tighter than the
Bernstein bound used before, ``z = a + sqrt(a^2 + 2 L m)``, ``a = L M / 3``, ``M = max |g|``, and
much tighter for biased codes, whose ``M`` is large: ``python experiments/tardos_bias_sim.py``
compares them (``results/tardos_bias_sim.md``). For ``p = 1/2`` every term is +-1, the score is
``2 * matching bits - m`` and Chernoff's bound is the binomial one, ``exp(-m KL((1 + z/m)/2 || 1/2))``.

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
    p = _biases(y, biases)
    one, zero = np.sqrt((1 - p) / p), np.sqrt(p / (1 - p))
    # rows: the user's bit x; the term for y = 1 is (one if x else -zero), for y = 0 (-one if x else zero)
    agree_one = np.where(codes == 1, one, -zero)
    agree_zero = np.where(codes == 1, -one, zero)
    terms = np.where(y == 1, agree_one, np.where(y == 0, agree_zero, 0.0))
    return terms.sum(axis=1)


# Chernoff's lam grid: wide enough for +-1 terms near the end of their range (lam ~ atanh(z/m) up
# to ~10) and for arcsine terms of up to ~30 (lam ~ 1e-3); 400 points cost microseconds per trace.
_LAMBDAS = np.geomspace(1e-4, 40.0, 400)


def _log_mgf(pirate: np.ndarray, biases: np.ndarray) -> np.ndarray:
    """``K(lam)`` for every ``lam`` of the grid: an innocent's score's log moment generating function
    given the pirate bits (erased positions add 0)."""
    y, p = np.asarray(pirate), np.asarray(biases, dtype=np.float64)
    one, zero = np.sqrt((1 - p) / p), np.sqrt(p / (1 - p))
    lam = _LAMBDAS[:, None]
    # y = 1: +one when x = 1 (prob p), -zero otherwise; y = 0: +zero when x = 0, -one otherwise
    k_one = np.logaddexp(np.log(p) + lam * one, np.log1p(-p) - lam * zero)
    k_zero = np.logaddexp(np.log1p(-p) + lam * zero, np.log(p) - lam * one)
    return np.where(y == 1, k_one, np.where(y == 0, k_zero, 0.0)).sum(axis=1)


def _biases(pirate: np.ndarray, biases: np.ndarray | None) -> np.ndarray:
    m = np.asarray(pirate).shape[0]
    p = np.full(m, 0.5) if biases is None else np.asarray(biases, dtype=np.float64)
    if p.shape != (m,) or np.any(p <= 0) or np.any(p >= 1):
        raise DataError(f"biases must be {m} values in (0, 1)")
    return p


def tardos_threshold(pirate, n_users: int, fpr: float, biases: np.ndarray | None = None) -> float:
    """Score above which a user is accused: Chernoff's bound given the pirate bits (1, 0, or -1
    for erased) and the code biases (None: 1/2 everywhere), Bonferroni over ``n_users``."""
    check_probability("fpr", fpr)
    check_int("number of users", n_users)
    return _threshold(_log_mgf(pirate, _biases(pirate, biases)), n_users, fpr)


def _threshold(log_mgf: np.ndarray, n_users: int, fpr: float) -> float:
    return float(np.min((log_mgf + math.log(n_users / fpr)) / _LAMBDAS))


def tardos_p_value_bound(score: float, pirate, n_users: int, biases: np.ndarray | None = None) -> float:
    """``n_users * min_lam exp(-lam score + K(lam))``, capped at 1: the Bonferroni-corrected bound on
    an innocent scoring ``score`` or more."""
    return _p_value_bound(score, _log_mgf(pirate, _biases(pirate, biases)), n_users)


def _p_value_bound(score: float, log_mgf: np.ndarray, n_users: int) -> float:
    return min(1.0, float(n_users * np.exp(np.min(log_mgf - _LAMBDAS * float(score)))))


def tardos_trace(probs, index: CodeIndex, fpr: float = 1e-6, top: int = 10, biases: np.ndarray | None = None) -> dict:
    """Rank the registry's users by symmetric Tardos score against a suspect set's soft outputs.

    Returns ``{"threshold", "erased", "suspects": [...]}`` with per suspect ``user_id``, ``score``,
    ``p_value_bound`` (Chernoff, times ``N``) and ``accused``; by decreasing score."""
    check_probability("fpr", fpr)
    pirate = pirate_bits(probs)
    n = len(index)
    log_mgf = _log_mgf(pirate, _biases(pirate, biases))  # once: the threshold and every p-value use it
    threshold = _threshold(log_mgf, max(n, 1), fpr)
    if n == 0:
        return {"threshold": threshold, "erased": int((pirate < 0).sum()), "suspects": []}
    scores = tardos_scores(pirate, index.bits(), biases)
    keep = max(int(top), int((scores >= threshold).sum()))
    suspects = []
    for i in np.argsort(-scores, kind="stable")[:keep]:
        s = float(scores[i])
        suspects.append({"user_id": index.user_ids[i], "score": s,
                         "p_value_bound": _p_value_bound(s, log_mgf, n), "accused": bool(s >= threshold)})
    return {"threshold": threshold, "erased": int((pirate < 0).sum()), "suspects": suspects}
