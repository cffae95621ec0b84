"""The whiteness penalty (FingerprintModule ``whiteness_weight``): it keeps a learned reader's
logits white on unmarked outputs while its filters train, so the whitening fitted after training
has little left to move."""

from __future__ import annotations

import pytest
import torch

from fingerprint_lm.errors import ConfigError
from fingerprint_lm.lit.fingerprinting import FingerprintModule
from fingerprint_lm.lit.whiteness import whiteness_penalty
from fingerprint_lm.methods.pnm import PNMMethod
from fingerprint_lm.models.pnm import PersonalizedDecoder
from fingerprint_lm.models.pooled_extractor import BandEnergyExtractor
from fingerprint_lm.models.vae import build_vae
from tests.test_rewhitening import module_with_learned_reader, unmarked


def test_penalty_is_near_zero_for_white_logits_and_grows_with_offset_and_correlation():
    generator = torch.Generator().manual_seed(0)
    white = 3.0 * torch.randn(4096, 8, generator=generator)
    assert whiteness_penalty(white, 3.0) < 0.01
    assert whiteness_penalty(white + 3.0, 3.0) > 0.9  # every logit off by one gain
    shared = torch.randn(4096, 1, generator=generator)
    correlated = 3.0 * (0.8 * shared + 0.6 * torch.randn(4096, 8, generator=generator))  # unit variance, corr 0.64
    assert whiteness_penalty(correlated, 3.0) > 0.3


@pytest.mark.parametrize(("weight", "batch"), [(-1.0, 64), (float("nan"), 64), (1.0, 8), (1.0, 0)])
def test_bad_weight_or_a_batch_no_larger_than_the_logits_is_refused(weight, batch):
    vae = build_vae()
    with pytest.raises(ConfigError, match="whiteness_"):
        FingerprintModule(vae, PersonalizedDecoder(vae.decoder, 8, mapping_hidden=16), BandEnergyExtractor(8),
                          whiteness_weight=weight, whiteness_batch=batch)


def test_codes_longer_than_the_default_batch_train_while_the_penalty_is_off():
    """The long-codes sweep trains 128- and 256-bit codes with the penalty off (weight 0): the
    batch only matters once the penalty is on."""
    vae = build_vae()
    pnm = PersonalizedDecoder(vae.decoder, 256, mapping_hidden=16)
    assert FingerprintModule(vae, pnm, BandEnergyExtractor(256)).whiteness_batch == 128
    with pytest.raises(ConfigError, match="whiteness_batch must exceed the 256 logits"):
        FingerprintModule(vae, pnm, BandEnergyExtractor(256), whiteness_weight=1.0)


def test_the_penalty_pulls_a_drifted_reader_back_to_white():
    """Filters moved away from the fitted whitening; steps of the penalty alone (no image, no bits
    loss) bring the stale whitening's logits back near mean 0 and unit covariance."""
    module = module_with_learned_reader(rewhiten_every=0)
    module.whitening_outputs = unmarked(256)
    module.refresh_whitening()
    with torch.no_grad():
        module.extractor.weight.add_(0.3 * torch.randn_like(module.extractor.weight))
        before = whiteness_penalty(module.extractor(module.whitening_outputs), module.extractor.gain).item()
    optimizer = torch.optim.Adam(module.extractor.parameters(), lr=3e-3)
    for _ in range(150):
        loss = whiteness_penalty(module.extractor(module.whitening_outputs), module.extractor.gain)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.2 * before


def test_training_step_adds_the_penalty_and_the_method_provides_the_unmarked_pool(monkeypatch):
    """With ``whiteness_weight`` > 0 the method hook holds the unmarked outputs (as for
    re-whitening) and a training step's loss carries the penalty; at weight 0 it does not."""
    method = PNMMethod(name="pnm", steps=1, extractor={"kind": "band_energy"}, detector_fit_samples=16)
    losses = {}
    for weight in (0.0, 5.0):
        module = module_with_learned_reader(rewhiten_every=0)
        module.whiteness_weight, module.whiteness_batch = weight, 16
        method.prepare_training(module, [{"image": unmarked(16)}])
        assert (module.whitening_outputs is not None) == (weight > 0)
        logged = {}
        module.log_dict = lambda values, **kw: logged.update(values)  # noqa: B023
        torch.manual_seed(3)
        module.training_step({"image": unmarked(4)}, 0)
        losses[weight] = (logged["train/loss"].item(), logged["train/whiteness"].item())
    assert losses[0.0][1] == 0.0 and losses[5.0][1] > 0.0
    assert losses[5.0][0] > losses[0.0][0]
