"""``soft_code_null`` decoding: the soft test, and every accused code's score tested against that
code's own law over unmarked images (registry/soft.py, experiments/results/soft_code_null.md)."""

import numpy as np
import pytest
import torch

from fingerprint_lm.distributor.attribution import attribute_logits, code_null
from fingerprint_lm.errors import ConfigError
from fingerprint_lm.models.extractor import FingerprintExtractor, soft_null
from fingerprint_lm.models.pooled_extractor import BandEnergyExtractor
from fingerprint_lm.registry.index import CodeIndex
from fingerprint_lm.registry.soft import CodeNull, code_p_values, identify_logits

K = 24


def unmarked(n: int, seed: int) -> np.ndarray:
    """Correlated logits with an offset: every bit moves with one shared image-wide factor, as the
    carrier reader's logits do on unmarked images (largest correlation eigenvalue about k / 2)."""
    rng = np.random.default_rng(seed)
    return 3.0 * rng.normal(size=(n, 1)) + rng.normal(size=(n, K)) + 0.5


def fitted_null(fit: np.ndarray) -> CodeNull:
    centre = np.median(fit, axis=0)
    values, vectors = np.linalg.eigh(np.cov((fit - centre).T))
    return CodeNull(centre, vectors @ np.diag(np.sqrt(values)) @ vectors.T)


def test_a_code_along_the_shared_direction_is_calibrated_per_code():
    null, test = fitted_null(unmarked(20000, 0)), unmarked(20000, 1)
    aligned, other = np.ones(K, dtype=np.uint8), np.tile([0, 1], K // 2).astype(np.uint8)
    p = null.p_values(test, np.stack([aligned, other]))
    assert abs((p[:, 0] <= 0.01).mean() - 0.01) < 0.004 and abs((p[:, 1] <= 0.01).mean() - 0.01) < 0.004
    # the exact soft tail (over random codes, given the image) is 1/2 the time tiny for the aligned code
    soft = code_p_values(test, aligned, "soft")
    assert (soft <= 0.01).mean() > 0.2
    checked = code_p_values(test, aligned, "soft_code_null", null)
    assert np.allclose(checked, np.maximum(soft, p[:, 0]), rtol=1e-12, atol=0) and (checked <= 0.01).mean() < 0.015


def test_soft_code_null_stops_the_aligned_codes_false_accusations_and_keeps_the_marked_ones():
    rng = np.random.default_rng(3)
    codes = np.concatenate([np.ones((1, K), np.uint8), rng.integers(0, 2, (99, K), dtype=np.uint8)])
    index = CodeIndex.from_bits([f"u{i}" for i in range(100)], codes)
    null, test = fitted_null(unmarked(20000, 4)), unmarked(2000, 5)
    plain = identify_logits(test, index, fpr=1e-2, decoding="soft")
    checked = identify_logits(test, index, fpr=1e-2, decoding="soft_code_null", code_null=null)
    assert sum(r["user_id"] == "u0" for r in plain) > 200  # the aligned code: a bound of 20 broken tenfold
    assert sum(r["accused"] for r in checked) <= 40
    marked = unmarked(200, 6) + 4.0 * (2.0 * codes[7] - 1)  # user 7's mark over the same content
    found = identify_logits(marked, index, fpr=1e-3, decoding="soft_code_null", code_null=null)
    exact = identify_logits(marked, index, fpr=1e-3, decoding="soft")
    right = [np.mean([r["user_id"] == "u7" for r in rows]) for rows in (found, exact)]
    wrong = [sum(r["accused"] and r["user_id"] != "u7" for r in rows) for rows in (found, exact)]
    assert right[0] == right[1] > 0.6 and wrong[0] == 0 < wrong[1]  # plain soft also names u0 on some
    for row, plain_row in zip(found, exact, strict=True):  # the larger of the two tests' p-values, corrected
        assert row["p_value"] >= plain_row["p_value"] and (row["p_value"] <= 1e-3) == row["accused"]


def test_the_null_comes_from_the_reader_and_an_unfitted_carrier_reader_is_refused():
    reader = FingerprintExtractor(K, tile_size=8, cnn_channels=())
    assert soft_null(reader) is None
    with pytest.raises(ConfigError, match="soft_code_null needs"):
        code_null(reader, "soft_code_null")
    assert code_null(reader, "soft") is None
    fit = unmarked(5000, 7)
    reader.fit_soft_whitening(torch.from_numpy(fit))
    centre, root = soft_null(reader)
    assert np.allclose(root @ root.T, np.cov(fit.T), rtol=0.05, atol=0.05)
    assert np.abs(centre - np.median(fit, axis=0)).max() < 0.2
    whitened = BandEnergyExtractor(K, gain=3.0)
    assert soft_null(whitened) is None  # not fitted yet
    whitened.fit_whitening(torch.randn(64, 3, 16, 16))
    centre, root = soft_null(whitened)  # gain x white with median 0
    assert not centre.any() and np.array_equal(root, 3.0 * np.eye(K))
    standardised = BandEnergyExtractor(K, gain=3.0, decorrelate=False)
    standardised.fit_whitening(torch.randn(64, 3, 16, 16))
    assert soft_null(standardised) is None  # per-logit standardised logits stay correlated


def test_attribute_logits_passes_the_null_through():
    codes = np.random.default_rng(0).integers(0, 2, (50, K), dtype=np.uint8)
    index = CodeIndex.from_bits([f"u{i}" for i in range(50)], codes)
    logits = 3.0 * (2.0 * codes[9] - 1)[None] * np.ones((2, 1))
    wide = CodeNull(np.zeros(K), 100.0 * np.eye(K))  # a law under which user 9's score is ordinary
    unit = CodeNull(np.zeros(K), np.eye(K))
    assert [r["user_id"] for r in
            attribute_logits(logits, index, ["a", "b"], 1e-3, "soft_code_null", null=unit)["images"]] == ["u9"] * 2
    with pytest.raises(ConfigError, match="needs the reader's law"):  # no silent fallback
        attribute_logits(logits, index, ["a", "b"], 1e-3, "soft_code_null")
    rows = attribute_logits(logits, index, ["a", "b"], 1e-3, "soft_code_null", null=wide)["images"]
    assert not any(r["accused"] for r in rows) and all(r["nearest_user_id"] == "u9" for r in rows)
