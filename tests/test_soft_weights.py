"""The carrier reader's soft-decision weights: its logits whitened on unmarked images, while its
bits stay the raw logits' signs (experiments/results/soft_weight_whitening.md)."""

import numpy as np
import pytest
import torch

from fingerprint_lm.distributor.attribution import attribute_logits, trace_logits
from fingerprint_lm.errors import DataError
from fingerprint_lm.models.extractor import FingerprintExtractor, soft_weights
from fingerprint_lm.models.pooled_extractor import BandEnergyExtractor
from fingerprint_lm.registry.index import CodeIndex


def correlated_logits(n: int, k: int = 12, seed: int = 0) -> torch.Tensor:
    """Logits sharing one strong direction, with an offset: what the carrier reader gives unmarked images."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.randn(n, 1, generator=g) * 4.0 * torch.linspace(-1, 1, k)
    return shared + torch.randn(n, k, generator=g) + 0.7


def test_fitted_soft_weights_are_white_with_median_zero_and_the_raw_logits_unchanged():
    reader = FingerprintExtractor(12, tile_size=8, cnn_channels=())
    images = torch.randn(4, 3, 16, 16)
    before = reader(images)
    assert torch.equal(reader.soft_weights(before), before.double())  # identity until fitted
    reader.fit_soft_whitening(correlated_logits(4000))
    assert torch.equal(reader(images), before)  # the bits are read as before
    weights = reader.soft_weights(correlated_logits(4000, seed=1))
    assert torch.allclose(torch.cov(weights.T), torch.eye(12, dtype=weights.dtype), atol=0.12)
    assert weights.median(dim=0).values.abs().max() < 0.1
    raw = correlated_logits(4000, seed=1).double()
    assert torch.linalg.eigvalsh(torch.corrcoef(raw.T)).max() > 5  # what the fit removes


def test_soft_whitening_travels_in_the_state_dict_and_old_state_dicts_load_as_identity():
    reader = FingerprintExtractor(12, tile_size=8, cnn_channels=())
    reader.fit_soft_whitening(correlated_logits(500))
    copy = FingerprintExtractor(12, tile_size=8, cnn_channels=())
    copy.load_state_dict(reader.state_dict())
    logits = correlated_logits(5, seed=2)
    assert torch.equal(copy.soft_weights(logits), reader.soft_weights(logits))
    old = {k: v for k, v in reader.state_dict().items() if not k.startswith("soft_")}
    legacy = FingerprintExtractor(12, tile_size=8, cnn_channels=())
    legacy.load_state_dict(old)  # a checkpoint written before the soft whitening existed
    assert torch.equal(legacy.soft_weights(logits), logits.double())


def test_too_few_unmarked_images_is_a_data_error():
    with pytest.raises(DataError, match="more than 12 unmarked images"):
        FingerprintExtractor(12, tile_size=8, cnn_channels=()).fit_soft_whitening(correlated_logits(12))


def test_a_whitened_reader_is_its_own_soft_weights():
    reader = BandEnergyExtractor(8)
    logits = np.random.default_rng(0).normal(size=(3, 8))
    assert np.array_equal(soft_weights(reader, logits), logits)
    assert np.array_equal(soft_weights(torch.nn.Identity(), logits), logits)  # no soft_weights: the logits


def test_attribution_scores_the_weights_and_reports_the_raw_bits():
    codes = np.random.default_rng(0).integers(0, 2, (50, 24), dtype=np.uint8)
    index = CodeIndex.from_bits([f"u{i}" for i in range(50)], codes)
    logits = (2.0 * codes[7] - 1)[None] * np.ones((2, 1))  # user 7's raw bits ...
    weights = (2.0 * codes[3] - 1)[None] * np.ones((2, 1))  # ... but the weights point at user 3
    whitened = attribute_logits(logits, index, ["a", "b"], fpr=1e-3, decoding="soft_whitened", weights=weights)
    assert [r["user_id"] for r in whitened["images"]] == ["u3", "u3"]
    assert whitened["images"][0]["bits"] == "".join(map(str, codes[7])) and whitened["decoding"] == "soft_whitened"
    for decoding in ("soft", "hard"):  # both read the raw logits
        rows = attribute_logits(logits, index, ["a", "b"], fpr=1e-3, decoding=decoding, weights=weights)["images"]
        assert [r["user_id"] for r in rows] == ["u7", "u7"], decoding
    traced = trace_logits(logits, index, ["a", "b"], fpr=1e-3, decoding="soft_whitened", weights=weights)["suspects"]
    assert any(s["user_id"] == "u3" and s["n_images"] == 2 for s in traced)  # per-image evidence: the weights
