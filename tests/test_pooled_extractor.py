"""The shift-invariant extractor (models/pooled_extractor.py): invariance, whitening, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fingerprint_lm.data.synthetic import ProceduralImages
from fingerprint_lm.errors import ConfigError, DataError
from fingerprint_lm.models.batched import evaluating
from fingerprint_lm.models.extractor import soft_null
from fingerprint_lm.models.pooled_extractor import (
    MIN_SIZE,
    BandEnergyExtractor,
    PooledExtractor,
    WhitenedReader,
    bit_slopes,
)


def images(count: int, resolution: int = 32, seed: int = 4) -> torch.Tensor:
    data = ProceduralImages(resolution=resolution, seed=seed, length=count)
    return torch.stack([data.sample(i)["image"] for i in range(count)])


@pytest.fixture(scope="module")
def extractor() -> PooledExtractor:
    torch.manual_seed(0)
    model = PooledExtractor(16, width=16, depth=3)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so eval mode is not an identity
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    return model.eval()


def test_output_is_invariant_to_circular_shifts(extractor):
    x = images(4)
    with torch.no_grad():
        reference = extractor(x)
        for dy, dx in [(1, 0), (0, 3), (7, 5), (16, 31)]:
            shifted = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
            # float32 summation order is the only difference (tolerance 1e-4 on logits of size ~1)
            torch.testing.assert_close(extractor(shifted), reference, atol=1e-4, rtol=0)
    # ... and it is not a constant: other images give other logits
    assert (extractor(images(4, seed=9)) - reference).abs().max() > 1e-2


def test_plain_shifts_and_crops_change_it_only_through_the_border(extractor):
    """A shift without wrap-around (a crop at an offset) moves the border: the logits change a
    little, far less than between two different images."""
    x = images(8, resolution=64)
    with torch.no_grad():
        full = extractor(x[..., 1:, 1:])
        shifted = extractor(x[..., :-1, :-1])
        other = extractor(images(8, resolution=64, seed=9)[..., 1:, 1:])
    assert (full - shifted).abs().mean() < 0.2 * (full - other).abs().mean()


def test_whitening_gives_median_zero_decorrelated_unit_variance_logits_on_unmarked_images(extractor):
    torch.manual_seed(1)
    model = PooledExtractor(8, width=16, depth=2).eval()
    unmarked = images(400)
    raw = model(unmarked)
    assert raw.mean(0).abs().max() > 1e-3  # not already white
    model.fit_whitening(unmarked)
    logits = model(unmarked).double()
    # the median, not the mean, is 0: each bit of an unmarked image is a fair coin
    assert ((logits > 0).double().mean(0) - 0.5).abs().max() <= 1 / 400
    covariance = torch.cov(logits.T)
    torch.testing.assert_close(covariance, torch.eye(8, dtype=torch.float64), atol=1e-3, rtol=0)
    fresh = model(images(400, seed=11))
    bits = (fresh > 0).float().mean(0)  # unseen unmarked images: bits close to balanced
    assert bits.min() > 0.3 and bits.max() < 0.7


def test_whitening_balances_skewed_logits():
    """Log-energies are skewed: with mean centring 0.569 of the bits of unmarked images were 1
    (experiments/unmarked_attribution.py); median centring makes every bit a fair coin."""
    class Skewed(WhitenedReader):
        def raw_logits(self, images):
            return images.flatten(1)[:, :4].exp()  # log-normal: mean well above the median

    reader = Skewed(4)
    data = torch.randn(8000, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    reader.fit_whitening(data)
    fresh = torch.randn(4000, 3, 2, 2, generator=torch.Generator().manual_seed(1))
    ones = (reader(fresh) > 0).float().mean(0)
    assert (ones - 0.5).abs().max() < 0.03, ones  # sampling error alone: about 0.006 + 0.008
    raw = reader.raw_logits(fresh)  # the control: these data are skewed, so mean centring is far from fair
    assert ((raw > raw.mean(0)).float().mean(0) - 0.5).abs().min() > 0.1


def test_mean_centre_and_per_logit_standardisation_on_request():
    """centre="mean": zero-mean whitened logits; decorrelate=False: a diagonal matrix, unit variance
    per logit, correlations left as they were (experiments/results/whitening_table.md)."""
    model = PooledExtractor(8, width=16, depth=2).eval()
    model.centre, model.decorrelate = "mean", False
    unmarked = images(400)
    model.fit_whitening(unmarked)
    logits = model(unmarked).double()
    assert logits.mean(0).abs().max() < 1e-4
    assert torch.equal(model.whiten_matrix, torch.diag(torch.diag(model.whiten_matrix)))
    torch.testing.assert_close(logits.var(0), torch.ones(8, dtype=torch.float64), atol=1e-3, rtol=0)
    with pytest.raises(ConfigError, match="centre"):
        BandEnergyExtractor(8, centre="mode")


def test_bad_input_is_a_data_error(extractor):
    with pytest.raises(DataError, match=f"at least {MIN_SIZE} px"):
        extractor(torch.zeros(1, 3, MIN_SIZE - 1, 32))
    with pytest.raises(DataError, match="more than 16 unmarked images"):
        extractor.fit_whitening(images(16))
    with pytest.raises(ConfigError, match="fingerprint length must be a positive integer, got 0"):
        PooledExtractor(0)
    with pytest.raises(ConfigError, match="extractor depth must be a positive integer, got 0"):
        PooledExtractor(8, depth=0)


def test_a_band_reader_with_learned_filters_starts_at_the_secret_bank_and_trains():
    fixed = BandEnergyExtractor(8, seed=3)
    learned = BandEnergyExtractor(8, seed=3, learn_filters=True)
    assert list(fixed.parameters()) == [] and list(learned.parameters()) == [learned.weight]
    assert torch.equal(fixed.weight, learned.weight)
    learned.raw_logits(images(4)).sum().backward()
    assert learned.weight.grad is not None and learned.weight.grad.abs().sum() > 0
    with torch.no_grad():
        learned.weight.add_(0.1 * torch.randn_like(learned.weight))
    # one state-dict key either way: a checkpoint loads whichever way its reader was trained
    fixed.load_state_dict(learned.state_dict())
    assert torch.equal(fixed.weight, learned.weight)


def test_bit_slopes_recover_each_bits_reliability_and_calibration_keeps_the_signs():
    """Bits drawn from sigmoid(a_j l) with known slopes: the fit finds them; a bit the logit
    does not predict gets a slope near the floor, never a negative one; the calibrated reader
    reads the same hard bits, with each logit scaled by its slope."""
    generator = torch.Generator().manual_seed(0)
    true = torch.tensor([0.5, 1.0, 2.0, 0.0])
    logits = torch.randn(20000, 4, generator=generator) * 2
    bits = (torch.rand(20000, 4, generator=generator) < torch.sigmoid(logits * true)).long()
    slopes = bit_slopes(logits, bits)
    assert torch.allclose(slopes[:3], true[:3].double(), atol=0.08), slopes
    assert 0.05 <= slopes[3] < 0.1
    # separable data keep a finite slope (the prior), not one that runs off
    assert torch.isfinite(bit_slopes(logits, (logits > 0).long())).all()

    reader = PooledExtractor(4, width=8, depth=2)
    images = ProceduralImages(16, seed=1, length=8)
    batch = torch.stack([images.sample(i)["image"] for i in range(8)])
    with torch.no_grad():
        before = reader(batch)
        applied = reader.calibrate_bit_slopes(logits, bits)
        after = reader(batch)
    assert torch.equal(applied, slopes)
    assert torch.allclose(after, before * slopes.float(), atol=1e-5)
    assert torch.allclose(reader.soft_weights(after), before, atol=1e-5)  # soft_whitened: uncalibrated
    # soft_code_null's law of unmarked logits follows the scale (an uncalibrated whitened reader: gain I)
    reader.fit_whitening(batch.repeat(2, 1, 1, 1) + 0.01 * torch.randn(16, 3, 16, 16, generator=generator))
    assert np.allclose(soft_null(reader)[1], reader.gain * np.diag(slopes.numpy()), atol=1e-6)
    # a reader saved before calibration existed (no bit_scale) loads uncalibrated
    old = {k: v for k, v in reader.state_dict().items() if k != "bit_scale"}
    fresh = PooledExtractor(4, width=8, depth=2)
    fresh.load_state_dict(old)
    assert torch.equal(fresh.bit_scale, torch.ones(4))
    with pytest.raises(ConfigError, match="same-shaped"):
        bit_slopes(logits, bits[:, :3])


def test_fitting_the_whitening_gives_every_submodule_its_own_mode_back():
    """The fit reads in eval mode (BatchNorm's running statistics, not the batch's), then each
    submodule gets its own mode back: a part frozen in eval mode inside a training reader stays in
    eval mode (``reader.train(True)`` would have switched it back to training), also after an error."""
    torch.manual_seed(0)
    reader = PooledExtractor(8, width=8, depth=2).train()
    frozen = next(m for m in reader.modules() if isinstance(m, torch.nn.BatchNorm2d)).eval()
    before = [m.training for m in reader.modules()]
    assert any(before) and not all(before)
    reader.fit_whitening(images(32, resolution=16))
    assert [m.training for m in reader.modules()] == before and not frozen.training
    with pytest.raises(RuntimeError, match="mid-read"), evaluating(reader):
        assert not any(m.training for m in reader.modules())
        raise RuntimeError("mid-read")
    assert [m.training for m in reader.modules()] == before


def test_a_luma_band_reader_keeps_the_secret_bands_and_ignores_chroma():
    """colour=luma: the same secret frequencies and orientations, every band along BT.601 luma, so a
    texture that changes only chroma (zero luma) leaves its raw band energies where they were."""
    random, luma = BandEnergyExtractor(48), BandEnergyExtractor(48, colour="luma")
    assert torch.equal(random.band_frequency, luma.band_frequency) and torch.equal(random.band_angle, luma.band_angle)
    expected = torch.nn.functional.normalize(torch.tensor([0.299, 0.587, 0.114]), dim=0)
    assert torch.allclose(luma.band_colour, expected.expand(48, 3))
    images = torch.stack([s["image"] for s in ProceduralImages(resolution=32, seed=4, length=8)])
    chroma_only = torch.tensor([0.587, -0.299, 0.0])  # orthogonal to the luma weights
    wave = torch.sin(torch.arange(32) * 2.0)[None, :] * torch.ones(32, 1)
    shifted = images + 0.1 * wave * chroma_only[:, None, None]
    assert torch.allclose(luma.raw_logits(shifted), luma.raw_logits(images), atol=1e-4)
    assert not torch.allclose(random.raw_logits(shifted), random.raw_logits(images), atol=1e-2)
    with pytest.raises(ConfigError, match="colour must be random or luma"):
        BandEnergyExtractor(48, colour="blue")
