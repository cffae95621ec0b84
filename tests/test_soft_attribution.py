"""Soft-decision attribution (fingerprint_lm/registry/soft.py): its exact null distribution, that
hard decoding is its special case, and what it buys on weak, noisy logits."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy.stats import binom

from fingerprint_lm.errors import ConfigError, DataError
from fingerprint_lm.registry.index import CodeIndex
from fingerprint_lm.registry.soft import (
    code_p_values,
    identify_logits,
    quantized_weights,
    soft_identify,
    soft_tail,
)


def test_unit_weights_give_the_binomial_tail():
    weights = np.ones((1, 48), dtype=np.int64)
    for matches in (0, 24, 30, 40, 48):
        assert soft_tail(weights, [matches])[0] == pytest.approx(binom.sf(matches - 1, 48, 0.5), rel=1e-12)


def test_tail_matches_enumeration_with_negative_and_zero_weights():
    rng = np.random.default_rng(0)
    for weights in rng.integers(-6, 7, (4, 11)):
        sums = np.array([np.dot(c, weights) for c in itertools.product((0, 1), repeat=11)])
        for t in (-20, -3, 0, 5, 12, 40):
            assert soft_tail(weights[None], [t])[0] == pytest.approx(np.mean(sums >= t), abs=1e-15)


def test_quantized_weights_scale_each_row_and_reject_bad_logits():
    weights = quantized_weights(np.array([[0.5, -1.0, 0.25], [0.0, 0.0, 0.0]]), levels=8)
    assert weights.tolist() == [[4, -8, 2], [0, 0, 0]]
    with pytest.raises(DataError):
        quantized_weights(np.array([[np.nan, 1.0]]))


def _population(n_users=500, k=48, seed=1):
    codes = np.random.default_rng(seed).integers(0, 2, (n_users, k), dtype=np.uint8)
    return codes, CodeIndex.from_bits([f"u{i}" for i in range(n_users)], codes)


def test_noise_logits_accuse_nobody_and_p_values_are_calibrated():
    codes, index = _population()
    logits = np.random.default_rng(2).standard_normal((2000, 48)) * np.random.default_rng(3).exponential(1, (2000, 1))
    # an image independent of every code: some innocent is accused with probability <= fpr
    assert sum(r["accused"] for r in soft_identify(logits, index, fpr=0.01)) <= 0.01 * 2000 * 1.3
    assert not any(r["accused"] for r in soft_identify(logits, index, fpr=1e-5))
    # uncorrected p-values of every (image, user) pair: P[p <= a] <= a for an image independent of the codes
    weights = quantized_weights(logits[:200])
    scores = weights @ codes[:50].T.astype(np.int64)
    p = soft_tail(weights, scores)  # every code's score on each image, each image's law built once
    assert np.array_equal(p, np.stack([soft_tail(weights, scores[:, j]) for j in range(50)], axis=1))
    for alpha in (0.01, 0.05, 0.2):
        assert np.mean(p <= alpha) <= alpha * 1.15


def test_soft_beats_hard_when_confident_bits_are_the_right_ones():
    """Logits whose sign is right 80% of the time, the wrong ones small: hard decoding (0.8 bit
    accuracy) names few users at fpr 1e-6 among 500, soft decoding names most, nobody wrongly."""
    codes, index = _population()
    rng = np.random.default_rng(4)
    truth = rng.integers(0, len(codes), 300)
    sign = 2.0 * codes[truth] - 1
    right = rng.random(sign.shape) < 0.8
    logits = np.where(right, sign * rng.uniform(0.5, 3.0, sign.shape), -sign * rng.uniform(0.0, 0.5, sign.shape))
    hard = index.identify_many((logits > 0).astype(np.uint8), fpr=1e-6)
    soft = soft_identify(logits, index, fpr=1e-6)
    named = [f"u{t}" for t in truth]
    hard_rate = np.mean([r["user_id"] == u for r, u in zip(hard, named)])
    soft_rate = np.mean([r["user_id"] == u for r, u in zip(soft, named)])
    assert soft_rate > hard_rate + 0.3
    assert all(r["user_id"] in (None, u) for r, u in zip(soft, named))


def test_soft_identify_fields_and_checks():
    codes, index = _population(n_users=20, k=16)
    row = soft_identify((2.0 * codes[3] - 1)[None] * 3.0, index, fpr=1e-3)[0]
    assert row["user_id"] == "u3" and row["accused"] and row["matching_bits"] == 16
    assert row["p_value"] == pytest.approx(20 * 2.0**-16)
    with pytest.raises(DataError):
        soft_identify(np.zeros((1, 8)), index)
    empty = CodeIndex.from_bits([], np.zeros((0, 16), dtype=np.uint8))
    assert soft_identify(np.ones((2, 16)), empty) == [soft_identify(np.ones((1, 16)), empty)[0]] * 2


def test_pruned_search_names_the_best_scoring_user_of_the_whole_registry():
    codes, index = _population(n_users=3000, k=32, seed=7)
    rng = np.random.default_rng(8)
    truth = rng.integers(0, len(codes), 200)
    logits = (2.0 * codes[truth] - 1) * rng.exponential(1.0, (200, 32)) + rng.standard_normal((200, 32)) * 0.8
    results = soft_identify(logits, index, fpr=1e-3)
    weights = quantized_weights(logits)
    scores = weights @ codes.T.astype(np.int64)
    assert any(r["accused"] for r in results) and not all(r["accused"] for r in results)
    for i, (row, image_scores) in enumerate(zip(results, scores)):
        if row["accused"]:
            assert row["score"] == image_scores.max()
            assert row["user_id"] == f"u{int(image_scores.argmax())}"
            assert row["n_nearest"] == int((image_scores == image_scores.max()).sum())
        else:  # nobody reaches the threshold: the best score is not accusable either
            assert len(index) * soft_tail(weights[i : i + 1], [image_scores.max()])[0] > 1e-3


def test_identify_logits_and_code_p_values_agree_with_hard_decoding():
    codes, index = _population(n_users=50, k=24)
    logits = np.random.default_rng(9).standard_normal((30, 24))
    hard = identify_logits(logits, index, fpr=0.5, decoding="hard")
    assert hard == index.identify_many((logits > 0).astype(np.uint8), fpr=0.5)
    matches = ((logits > 0) == codes[0]).sum(axis=1)
    assert np.allclose(code_p_values(logits, codes[0], "hard"), binom.sf(matches - 1, 24, 0.5))
    assert np.allclose(code_p_values(np.sign(logits), codes[0], "soft"), binom.sf(matches - 1, 24, 0.5))
    with pytest.raises(ConfigError):
        identify_logits(logits, index, decoding="fuzzy")


@pytest.mark.parametrize("k", [65, 130, 256])
def test_long_codes_score_straight_from_the_packed_words(k):
    """Several uint64 words per code: the pruned search and its per-byte scoring agree with the
    unpacked scores; a tiny positive logit (weight 0) still counts as a 1-bit in matching_bits."""
    codes, index = _population(n_users=400, k=k, seed=k)
    rng = np.random.default_rng(k)
    truth = rng.integers(0, len(codes), 20)
    logits = (2.0 * codes[truth] - 1) * rng.exponential(2.0, (20, k)) + 0.5 * rng.standard_normal((20, k))
    logits[:, 0] = 1e-9
    results = soft_identify(logits, index, fpr=1e-6)
    scores = quantized_weights(logits) @ codes.T.astype(np.int64)
    assert sum(r["accused"] for r in results) >= 15
    for row, image_scores, image_logits in zip(results, scores, logits):
        user = int(row["nearest_user_id"][1:])
        assert row["score"] == image_scores[user]
        assert row["matching_bits"] == int(((image_logits > 0) == codes[user]).sum())
        if row["accused"]:
            assert row["score"] == image_scores.max()


def test_hard_identify_logits_takes_one_image_and_checks_the_code_length():
    codes, index = _population(n_users=10, k=16)
    assert identify_logits(2.0 * codes[2] - 1, index, fpr=1e-2, decoding="hard")[0]["user_id"] == "u2"
    with pytest.raises(DataError):
        identify_logits(np.zeros((3, 32)), index, decoding="hard")
