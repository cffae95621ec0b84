"""Bit statistics: exact binomial p-values, Bonferroni, the match threshold and bit accuracy."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from fingerprint_lm.errors import ConfigError, DataError
from fingerprint_lm.metrics.bits import binomial_p_value, bit_accuracy, bonferroni, match_threshold

K = 48


def _exact_tail(m: int, k: int) -> float:
    return float(Fraction(sum(math.comb(k, j) for j in range(m, k + 1)), 2**k))



# -- statistics -----------------------------------------------------------------------------------


def test_p_values_match_field_figures():
    assert binomial_p_value(41, 48) == pytest.approx(3.1e-7, rel=0.01)
    assert binomial_p_value(44, 48) == pytest.approx(7.6e-10, rel=0.01)
    assert binomial_p_value(0, 48) == 1.0
    assert binomial_p_value(48, 48) == pytest.approx(2.0**-48, rel=1e-12)


@pytest.mark.parametrize("m,k", [(41, 48), (200, 256), (240, 256), (256, 256), (30, 32)])
def test_p_value_exact_in_far_tail(m, k):
    assert binomial_p_value(m, k) == pytest.approx(_exact_tail(m, k), rel=1e-9)


def test_p_value_vectorised_and_validated():
    m = np.array([[0, 24, 41], [44, 47, 48]])
    p = binomial_p_value(m, 48)
    assert p.shape == (2, 3)
    assert p.ravel().tolist() == pytest.approx([binomial_p_value(int(x), 48) for x in m.ravel()], rel=1e-12)
    assert np.all(np.diff(p.ravel()) < 0)
    with pytest.raises(DataError):
        binomial_p_value(49, 48)
    with pytest.raises(DataError):
        binomial_p_value(2.5, 48)


def test_bonferroni():
    assert bonferroni(1e-9, 1000) == pytest.approx(1e-6)
    assert bonferroni(0.3, 10) == 1.0
    np.testing.assert_allclose(bonferroni(np.array([1e-3, 0.5]), 4), [4e-3, 1.0])


def test_match_threshold():
    assert match_threshold(48, 1e-6) == 41  # p(41) = 3.1e-7 <= 1e-6 < p(40) = 1.65e-6
    for k, fpr, n in [(48, 1e-6, 1), (48, 1e-6, 10_000), (256, 1e-9, 10**6), (32, 1e-3, 5)]:
        m = match_threshold(k, fpr, n)
        assert bonferroni(binomial_p_value(m, k), n) <= fpr
        assert bonferroni(binomial_p_value(m - 1, k), n) > fpr
    assert match_threshold(48, 1e-6, 10_000) > match_threshold(48, 1e-6)
    with pytest.raises(ConfigError):
        match_threshold(32, 1e-6, 10**6)  # 2**-32 * 1e6 > 1e-6: nobody can ever be accused
    with pytest.raises(ConfigError):
        match_threshold(48, 0.0)


def test_bit_accuracy():
    true = np.array([[1, 0, 1, 0], [1, 1, 1, 1]])
    pred = np.array([[1, 0, 0, 0], [0, 0, 1, 1]])
    assert bit_accuracy(pred, true) == pytest.approx(5 / 8)
    np.testing.assert_allclose(bit_accuracy(pred, true, axis=-1), [0.75, 0.5])
    assert bit_accuracy(np.array([0.9, 0.2, 0.4, 0.7]), np.array([1, 0, 1, 1])) == pytest.approx(0.75)
    with pytest.raises(DataError):
        bit_accuracy(np.zeros(3), np.zeros(4))


