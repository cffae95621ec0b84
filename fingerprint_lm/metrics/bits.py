"""Bit-level statistics: bit accuracy and the binomial detection test.

Detection test (the one Stable Signature, Fernandez et al. 2023, and WOUAF, Kim et al. 2024,
report; docs/design.md, "Attribution and tracing"): an image whose extracted bits match a
``k``-bit code in ``m`` places has p-value ``P[Binomial(k, 1/2) >= m]`` under the hypothesis that
the image has nothing to do with that code (its bits are then fair coins). Identifying among ``N``
users multiplies the p-value by ``N`` (Bonferroni). A user is accused when the corrected p-value is
``<= fpr``; :func:`match_threshold` gives the number of matches where that starts.
"""

from __future__ import annotations

import numpy as np
from scipy.special import bdtrc

from fingerprint_lm.errors import ConfigError, DataError, check_int, check_probability


def binomial_p_value(matches, k: int):
    """``P[Binomial(k, 1/2) >= matches]``, exact down to the smallest doubles (``2**-k`` at ``m = k``).

    Uses the regularised incomplete beta function (``scipy.special.bdtrc``, what
    ``scipy.stats.binom.sf`` calls), which keeps relative accuracy in the far tail where
    ``1 - cdf`` would round to zero. Vectorised: ``matches`` may be an array;
    a scalar in gives a float out.
    """
    k = check_int("k", k, error=DataError)
    m = np.asarray(matches)
    if not np.issubdtype(m.dtype, np.integer):
        if not np.all(np.isfinite(m)) or np.any(m != np.round(m)):
            raise DataError("matches must be whole numbers")
        m = m.astype(np.int64)
    if np.any(m < 0) or np.any(m > k):
        raise DataError(f"matches must lie in [0, {k}]")
    p = np.where(m == 0, 1.0, bdtrc(np.maximum(m - 1, 0), k, 0.5))
    return float(p) if np.ndim(p) == 0 else np.asarray(p, dtype=np.float64)


def bonferroni(p, n: int):
    """Bonferroni correction for ``n`` tests: ``min(1, p * n)`` (scalar in, float out)."""
    n = check_int("number of tests", n, error=DataError)
    out = np.minimum(1.0, np.asarray(p, dtype=np.float64) * n)
    return float(out) if np.ndim(out) == 0 else out


def match_threshold(k: int, fpr: float, n_users: int = 1) -> int:
    """Smallest number of matching bits ``m`` with ``bonferroni(p(m), n_users) <= fpr``.

    Raises :class:`ConfigError` when even ``m = k`` is not significant enough (e.g. 32 bits
    cannot reach FPR 1e-6 among 10^4 users), rather than returning a threshold nobody can reach.
    """
    check_probability("fpr", fpr)
    k = int(k)
    corrected = bonferroni(binomial_p_value(np.arange(k + 1), k), n_users)
    ok = np.flatnonzero(corrected <= fpr)
    if ok.size == 0:
        raise ConfigError(
            f"{k} bits cannot reach fpr {fpr:g} among {n_users} users (best p-value {corrected[-1]:.3g})"
        )
    return int(ok[0])


def bit_accuracy(pred_bits, true_bits, axis=None):
    """Fraction of bits where ``pred_bits`` equals ``true_bits``.

    ``pred_bits`` may be soft outputs in [0, 1] (float): they are thresholded at 0.5. Shapes must
    match (or broadcast, e.g. ``[n, k]`` predictions against one ``[k]`` code). ``axis=None`` gives
    one float; ``axis=-1`` gives the accuracy of each row.
    """
    pred = np.asarray(pred_bits)
    true = np.asarray(true_bits)
    if np.issubdtype(pred.dtype, np.floating):
        pred = pred > 0.5
    try:
        equal = pred.astype(bool) == true.astype(bool)
    except ValueError as exc:
        raise DataError(f"bit arrays of shapes {pred.shape} and {true.shape} do not match") from exc
    if equal.size == 0:
        raise DataError("bit_accuracy of empty arrays")
    acc = equal.mean(axis=axis)
    return float(acc) if np.ndim(acc) == 0 else acc
