"""Colluder tracing: colluders rank first and are accused, innocents are not, the bound holds."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fingerprint_lm.errors import ConfigError, DataError
from fingerprint_lm.registry.index import CodeIndex
from fingerprint_lm.registry.store import Registry
from fingerprint_lm.registry.tracing import (
    bit_evidence,
    score_codes,
    trace,
    trace_evidence,
    tracing_threshold,
)


def _index(n: int, k: int, rng) -> tuple[CodeIndex, np.ndarray]:
    bits = rng.integers(0, 2, size=(n, k), dtype=np.uint8)
    return CodeIndex.from_bits([f"u{i}" for i in range(n)], bits), bits


def _merged_probs(codes: np.ndarray, rng, n_images: int = 8, noise: float = 0.2) -> np.ndarray:
    """Extractor outputs of a model merged from ``codes``: the colluders' mean bit plus noise."""
    return np.clip(codes.mean(axis=0) + rng.normal(0.0, noise, size=(n_images, codes.shape[1])), 0.0, 1.0)


@pytest.mark.parametrize("n_colluders", [2, 3])
def test_colluders_rank_first_and_are_accused(n_colluders):
    rng = np.random.default_rng(n_colluders)
    index, bits = _index(1000, 256, rng)
    for _ in range(5):
        colluders = rng.choice(1000, n_colluders, replace=False)
        suspects = trace(_merged_probs(bits[colluders], rng), index, fpr=1e-6, top=10)
        names = {f"u{i}" for i in colluders}
        assert {s["user_id"] for s in suspects[:n_colluders]} == names
        accused = {s["user_id"] for s in suspects if s["accused"]}
        assert accused and accused <= names
        scores = [s["score"] for s in suspects]
        assert scores == sorted(scores, reverse=True) and len(suspects) == 10


def test_short_codes_rank_colluders_but_stay_cautious():
    # 48 bits, 2 colluders: the pair ranks first, but the Hoeffding threshold at fpr 1e-6 among
    # 1000 users (6.44) is above their score (~4.9): tracing says it is not sure enough.
    rng = np.random.default_rng(20)
    index, bits = _index(1000, 48, rng)
    for _ in range(5):
        colluders = rng.choice(1000, 2, replace=False)
        suspects = trace(_merged_probs(bits[colluders], rng), index, fpr=1e-6, top=2)
        assert {s["user_id"] for s in suspects} == {f"u{i}" for i in colluders}
        assert not any(s["accused"] for s in suspects)
        assert all(s["p_value_bound"] > 1e-6 for s in suspects)


def test_all_accused_returned_beyond_top():
    rng = np.random.default_rng(21)
    index, bits = _index(300, 256, rng)
    suspects = trace(_merged_probs(bits[[3, 4, 5]], rng), index, fpr=1e-6, top=1)
    assert {s["user_id"] for s in suspects} == {"u3", "u4", "u5"}
    assert all(s["accused"] for s in suspects)


def test_no_accusation_for_unrelated_models():
    rng = np.random.default_rng(22)
    index, _ = _index(1000, 48, rng)
    accusations, smallest_bound = 0, 1.0
    for trial in range(200):
        outsiders = rng.integers(0, 2, size=(1 + trial % 3, 48))
        suspects = trace(_merged_probs(outsiders, rng), index, fpr=1e-3, top=3)
        accusations += sum(s["accused"] for s in suspects)
        smallest_bound = min(smallest_bound, suspects[0]["p_value_bound"])
    assert accusations == 0
    assert smallest_bound > 1e-3


@pytest.mark.parametrize("evidence", ["confident", "mixed", "one_strong_bit"])
def test_hoeffding_bound_holds_for_innocents(evidence):
    rng = np.random.default_rng(23)
    k = 48
    if evidence == "confident":  # |w_i| all equal: the score is a normalised binomial
        probs = rng.integers(0, 2, size=(4, k)).astype(float)
        probs[:] = probs[0]
    elif evidence == "mixed":
        probs = rng.random((4, k))
    else:
        probs = np.full((4, k), 0.55)
        probs[:, 0] = 1.0
    fpr = 0.05
    t = tracing_threshold(1, fpr)
    assert t == pytest.approx(math.sqrt(2 * math.log(20)))
    innocents = rng.integers(0, 2, size=(20_000, k), dtype=np.uint8)
    scores = score_codes(probs, innocents)
    assert abs(scores.mean()) < 0.05 and scores.var() == pytest.approx(1.0, abs=0.05)
    assert np.mean(scores >= t) <= fpr + 0.005
    # the same scores through trace() on a one-user registry
    for code in innocents[:50]:
        (only,) = trace(probs, CodeIndex.from_bits(["x"], code[None]), fpr=fpr, top=1)
        assert only["score"] == pytest.approx(score_codes(probs, code[None])[0])
        assert only["accused"] == (only["score"] >= t)


def test_score_of_own_code_and_p_value_bound():
    rng = np.random.default_rng(24)
    index, bits = _index(50, 64, rng)
    probs = bits[7][None].astype(float)  # a perfectly confident single copy
    suspects = trace(probs, index, fpr=1e-6, top=50)
    assert suspects[0]["user_id"] == "u7" and suspects[0]["score"] == pytest.approx(8.0)  # sqrt(64)
    for s in suspects:
        expected = min(1.0, 50 * math.exp(-(s["score"] ** 2) / 2)) if s["score"] > 0 else 1.0
        assert s["p_value_bound"] == pytest.approx(expected)
    np.testing.assert_allclose(
        sorted(s["score"] for s in suspects), np.sort(score_codes(probs, bits)), atol=1e-12
    )


def test_uninformative_outputs_accuse_nobody(tmp_path):
    rng = np.random.default_rng(25)
    with Registry(tmp_path / "r.sqlite", 48) as reg:
        reg.register_many((f"u{i}", rng.integers(0, 2, 48)) for i in range(20))
        suspects = trace(np.full((3, 48), 0.5), reg, fpr=0.5, top=5)
    assert len(suspects) == 5 and all(s["score"] == 0.0 and not s["accused"] for s in suspects)


def test_bad_inputs():
    rng = np.random.default_rng(26)
    index, _ = _index(10, 48, rng)
    with pytest.raises(DataError):
        trace(np.full((2, 32), 0.7), index)
    with pytest.raises(DataError):
        trace(np.full((2, 48), 1.5), index)
    with pytest.raises(DataError):
        bit_evidence(np.array([[np.nan] * 48]))
    with pytest.raises(ConfigError):
        trace(np.full((2, 48), 0.7), index, fpr=0.0)
    assert trace(np.full(48, 0.7), CodeIndex.from_bits([], np.zeros((0, 48), np.uint8))) == []


# -- both kinds of evidence (trace_evidence) -------------------------------------------------------
def _mixed_probs(codes: np.ndarray, rng, per_user: int = 4, flip: float = 0.05) -> np.ndarray:
    """Images pooled by colluders: ``per_user`` images of each colluder's copy, each carrying that
    colluder's full code with a few bits flipped (confident outputs, as a clean copy gives)."""
    rows = []
    for code in codes:
        for _ in range(per_user):
            noisy = np.where(rng.random(code.shape) < flip, 1 - code, code)
            rows.append(np.where(noisy == 1, 0.9, 0.1))
    return np.array(rows)[rng.permutation(len(rows))]


def test_pooled_images_of_several_users_name_each_of_them():
    """The issue's case: every image carries one user's full code. The pooled score alone accuses
    nobody (the evidence is a blend again); per-image attribution names each colluder."""
    rng = np.random.default_rng(7)
    index, bits = _index(1000, 48, rng)
    colluders = [3, 500, 999]
    probs = _mixed_probs(bits[colluders], rng)
    assert not [s for s in trace(probs, index, fpr=1e-6) if s["accused"]]
    result = trace_evidence(probs, index, fpr=1e-6, top=5)
    accused = {s["user_id"]: s for s in result["suspects"] if s["accused"]}
    assert set(accused) == {"u3", "u500", "u999"}
    assert all(s["evidence"] == "per_image" and s["n_images"] >= 1 for s in accused.values())
    assert result["per_image_fpr"] == pytest.approx(1e-6 / (2 * 12)) and result["pooled_fpr"] == 5e-7
    assert [s["accused"] for s in result["suspects"]] == sorted(
        (s["accused"] for s in result["suspects"]), reverse=True)


def test_a_merged_model_is_traced_by_the_pooled_score():
    """Five copies merged: no image is any one colluder's (hard bits match each code on ~5/8 of
    the bits), so with hard per-image decoding the accusations rest on the pooled score. Soft
    decoding also reads the bits the colluders agree on, confidently, from single images: it names
    colluders per image too, and never an innocent."""
    rng = np.random.default_rng(8)
    index, bits = _index(1000, 256, rng)
    colluders = {f"u{i}" for i in (10, 20, 30, 40, 50)}
    probs = _merged_probs(bits[[10, 20, 30, 40, 50]], rng, n_images=16, noise=0.1)
    hard = [s for s in trace_evidence(probs, index, fpr=1e-6, decoding="hard")["suspects"] if s["accused"]]
    assert hard and {s["user_id"] for s in hard} <= colluders
    assert all(s["evidence"] == "pooled" and s["n_images"] == 0 for s in hard)
    soft = [s for s in trace_evidence(probs, index, fpr=1e-6)["suspects"] if s["accused"]]
    assert {s["user_id"] for s in hard} <= {s["user_id"] for s in soft} <= colluders
    assert any(s["n_images"] > 0 for s in soft)


@pytest.mark.parametrize("fpr", [1e-6, 1e-3, 0.2])
def test_accused_exactly_when_the_bound_is_within_fpr_and_innocents_stay_free(fpr):
    rng = np.random.default_rng(9)
    index, bits = _index(2000, 48, rng)
    for probs in (rng.random((20, 48)), _mixed_probs(bits[[1]], rng, per_user=20)):
        for suspect in trace_evidence(probs, index, fpr=fpr, top=50)["suspects"]:
            assert suspect["accused"] == (suspect["p_value_bound"] <= fpr), suspect
    innocent = trace_evidence(rng.random((20, 48)), index, fpr=1e-6, top=50)["suspects"]
    assert not [s for s in innocent if s["accused"]]
