"""Symmetric Tardos scoring against its published formulas: term values, innocents' moments, the
Chernoff threshold, and colluders caught under the classic collusion strategies."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fingerprint_lm.errors import ConfigError, DataError
from fingerprint_lm.registry.index import CodeIndex
from fingerprint_lm.registry.tardos import (
    arcsine_biases,
    draw_tardos_codes,
    pirate_bits,
    tardos_p_value_bound,
    tardos_scores,
    tardos_threshold,
    tardos_trace,
)


def test_terms_are_skorics_symmetric_accusation():
    # p = 0.2: sqrt((1-p)/p) = 2, sqrt(p/(1-p)) = 0.5
    codes = np.array([[1], [0]], dtype=np.uint8)
    assert tardos_scores(np.array([1]), codes, np.array([0.2])).tolist() == [2.0, -0.5]
    assert tardos_scores(np.array([0]), codes, np.array([0.2])).tolist() == [-2.0, 0.5]
    assert tardos_scores(np.array([-1]), codes, np.array([0.2])).tolist() == [0.0, 0.0]  # erased


@pytest.mark.parametrize("p", [0.01, 0.2, 0.5, 0.9])
@pytest.mark.parametrize("y", [0, 1])
def test_an_innocents_term_has_mean_zero_and_variance_one(p, y):
    """Over the innocent's bit x ~ Bernoulli(p), whatever the pirate bit y."""
    one, zero = tardos_scores(np.array([y]), np.array([[1], [0]], dtype=np.uint8), np.array([p]))
    assert p * one + (1 - p) * zero == pytest.approx(0.0, abs=1e-12)
    assert p * one**2 + (1 - p) * zero**2 == pytest.approx(1.0)


def test_uniform_codes_score_two_matches_minus_length():
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 2, size=(50, 64), dtype=np.uint8)
    pirate = rng.integers(0, 2, size=64)
    assert np.array_equal(tardos_scores(pirate, codes), 2 * (codes == pirate).sum(axis=1) - 64)


def test_biases_follow_the_cut_arcsine_density():
    biases = arcsine_biases(200_000, 0.01, np.random.default_rng(1))
    assert biases.min() >= 0.01 and biases.max() <= 0.99
    # the arcsine CDF: P[p <= q] = (asin(sqrt(q)) - r0) / (pi/2 - 2 r0), r0 = asin(sqrt(t))
    r0 = math.asin(0.1)
    for q in (0.05, 0.25, 0.5):
        expected = (math.asin(math.sqrt(q)) - r0) / (math.pi / 2 - 2 * r0)
        assert np.mean(biases <= q) == pytest.approx(expected, abs=0.005)
    with pytest.raises(ConfigError):
        arcsine_biases(10, 0.5, np.random.default_rng(0))


def test_the_threshold_bounds_innocent_accusations():
    """Chernoff + Bonferroni: innocents' codes against random pirate strings, fpr 0.05 over 500
    users, 400 trials: far fewer trials with an accusation than 5%."""
    rng = np.random.default_rng(2)
    biases = arcsine_biases(128, 0.05, rng)
    trials_with_accusation = 0
    for _ in range(400):
        codes = draw_tardos_codes(500, biases, rng)
        pirate = (rng.random(128) < 0.5).astype(np.int8)
        threshold = tardos_threshold(pirate, 500, 0.05, biases)
        trials_with_accusation += bool((tardos_scores(pirate, codes, biases) >= threshold).any())
    assert trials_with_accusation <= 20


def _kl_half(q: float) -> float:
    return q * math.log(2 * q) + (1 - q) * math.log(2 * (1 - q))


@pytest.mark.parametrize("m", [48, 256])
def test_uniform_threshold_is_the_binomial_chernoff_bound(m):
    """For p = 1/2 the bound is exp(-m KL((1 + z/m)/2 || 1/2)) (Chernoff-Hoeffding for +-1 terms):
    the threshold solves m KL = ln(N / fpr), and is below Bernstein's a + sqrt(a^2 + 2 L m)."""
    pirate = np.random.default_rng(5).integers(0, 2, m)
    log_term = math.log(1000 / 1e-6)
    z = tardos_threshold(pirate, 1000, 1e-6)
    if m * math.log(2) <= log_term:  # 48 bits cannot reach fpr 1e-6 over 1000 users at all
        assert z > m
        return
    assert m * _kl_half((1 + z / m) / 2) == pytest.approx(log_term, rel=2e-3)
    a = log_term / 3
    assert z < a + math.sqrt(a * a + 2 * log_term * m)
    assert tardos_p_value_bound(z, pirate, 1000) == pytest.approx(1e-6, rel=0.05)
    # erased positions carry nothing: with every position erased nobody can be accused
    assert tardos_threshold(np.full(m, -1), 1000, 1e-6) > 0
    assert tardos_p_value_bound(0.0, np.full(m, -1), 1000) == 1.0


@pytest.mark.parametrize("strategy", ["majority", "interleave", "minority"])
def test_colluders_are_caught_and_innocents_are_not(strategy):
    rng = np.random.default_rng(3)
    c, m, n = 3, 1024, 1000
    cutoff = 0.05
    biases = arcsine_biases(m, cutoff, rng)
    codes = draw_tardos_codes(n, biases, rng)
    colluders = codes[:c]
    ones = colluders.sum(axis=0)
    if strategy == "majority":
        pirate = (2 * ones > c).astype(np.int8)
    elif strategy == "minority":  # where the colluders differ, output the rarer bit
        pirate = np.where((ones == 0) | (ones == c), colluders[0], (2 * ones < c)).astype(np.int8)
    else:
        pirate = colluders[rng.integers(0, c, size=m), np.arange(m)].astype(np.int8)
    scores = tardos_scores(pirate, codes, biases)
    threshold = tardos_threshold(pirate, n, 1e-3, biases)
    assert (scores[:c] >= threshold).any() and not (scores[c:] >= threshold).any()


def test_trace_over_a_registry_and_bad_input():
    rng = np.random.default_rng(4)
    bits = rng.integers(0, 2, size=(300, 256), dtype=np.uint8)
    index = CodeIndex.from_bits([f"u{i}" for i in range(300)], bits)
    probs = np.clip(bits[[7, 8]].mean(axis=0) + rng.normal(0, 0.2, size=(8, 256)), 0, 1)
    result = tardos_trace(probs, index, fpr=1e-3, top=3)
    assert {s["user_id"] for s in result["suspects"] if s["accused"]} <= {"u7", "u8"}
    assert result["suspects"][0]["user_id"] in {"u7", "u8"} and result["suspects"][0]["accused"]
    assert all(s["accused"] == (s["p_value_bound"] <= 1e-3) for s in result["suspects"])
    assert pirate_bits(np.full((2, 4), 0.5)).tolist() == [-1, -1, -1, -1]
    with pytest.raises(DataError):
        tardos_scores(np.array([1, 0]), np.zeros((3, 4), np.uint8))
