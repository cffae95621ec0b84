"""The worst-case term's ascent variants (lit/fingerprinting.py: wc_ascent, wc_every), on the tiny
default VAE; experiments/worst_case_cost.py measures what each costs and keeps."""

from __future__ import annotations

import math

import pytest
import torch

import fingerprint_lm.lit.fingerprinting as training
from fingerprint_lm.errors import ConfigError
from fingerprint_lm.lit.fingerprinting import FingerprintModule
from fingerprint_lm.lit.training_settings import WC_ASCENTS
from fingerprint_lm.models.augment import AugmentConfig
from fingerprint_lm.models.extractor import FingerprintExtractor
from fingerprint_lm.models.pnm import PersonalizedDecoder
from fingerprint_lm.models.vae import build_vae

NO_AUGMENT = AugmentConfig(p_noise=0, p_blur=0, p_jpeg=0, p_crop=0, p_brightness=0)


def _module(**kwargs) -> FingerprintModule:
    torch.manual_seed(6)
    vae = build_vae()
    pnm = PersonalizedDecoder(vae.decoder, 8, mapping_hidden=16)
    with torch.no_grad():
        for head in pnm.affine_heads.values():
            head.weight.normal_(0, 0.1)
    module = FingerprintModule(vae, pnm, FingerprintExtractor(8), augment=NO_AUGMENT, **kwargs)
    optimizer = module.configure_optimizers()
    module.optimizers = lambda: optimizer
    module.manual_backward = lambda loss: loss.backward()
    module.logged = {}
    module.log_dict = lambda d, **kw: module.logged.update(d)
    module.log = lambda *a, **kw: None
    return module


@pytest.mark.parametrize("ascent", WC_ASCENTS)
def test_every_ascent_variant_undoes_its_perturbation_and_trains_the_pnm(ascent):
    """After two steps the shared decoder is bit-exactly what it was and holds no gradients, the
    worst-case BCE was computed and the PNM moved; lagged keeps the last worst-case gradient as
    the next step's ascent direction."""
    module = _module(wc_steps=1, wc_rho=0.05, wc_ascent=ascent)
    decoder_before = {k: v.clone() for k, v in module.pnm.decoder.state_dict().items()}
    pnm_before = [p.detach().clone() for p in module.pnm.pnm_parameters()]
    images = torch.rand(4, 3, 32, 32) * 2 - 1
    for step in range(2):
        module.training_step({"image": images}, step)
        clean, worst = float(module.logged["train/bce"]), float(module.logged["train/bce_wc"])
        assert math.isfinite(worst) and worst != clean  # read at the perturbed weights, not the clean ones
        if ascent == "exact":  # its own gradient's direction: the BCE rises (reuse and lagged ascend stale ones)
            assert worst > clean, (step, clean, worst)
    for key, value in module.pnm.decoder.state_dict().items():
        assert torch.equal(value, decoder_before[key]), key
    assert all(w.grad is None and not w.requires_grad for w in module.decoder_weights())
    assert any(not torch.equal(a, b) for a, b in zip(pnm_before, module.pnm.pnm_parameters()))
    direction = getattr(module, "_lagged_direction", None)
    assert (direction is not None) == (ascent == "lagged")
    if direction is not None:
        assert sum(float(g.abs().sum()) for g in direction if g is not None) > 0
    module.on_train_end()  # the direction is no part of the state: fit() would leave it on the training device
    assert getattr(module, "_lagged_direction", None) is None


def test_a_step_whose_loss_is_not_finite_is_one_error_naming_the_likely_cause():
    """Training on NaN to the end of a run (metrics: psnr nan) was what model.dtype=float16 gave;
    the step that meets a non-finite loss stops the run with a hint instead."""
    module = _module(wc_steps=0)
    images = torch.rand(4, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        module.log_rec_weight.fill_(float("nan"))
    with pytest.raises(ConfigError, match="diverged at step 0: the loss is nan; lower the learning rates"):
        module.training_step({"image": images}, 0)
    module.pnm.decoder.half()
    with pytest.raises(ConfigError, match="model.dtype=float16 weights do not train"):
        module.training_step({"image": images}, 0)


def test_wc_every_adds_the_term_on_every_nth_step_only():
    module = _module(wc_steps=1, wc_every=2)
    images = torch.rand(4, 3, 32, 32) * 2 - 1
    seen = []
    for step in range(4):
        module.training_step({"image": images}, step)
        seen.append(float(module.logged["train/bce_wc"]) > 0)
    assert seen == [True, False, True, False]


def test_wc_start_holds_the_term_back_until_its_step(monkeypatch):
    module = _module(wc_steps=1, wc_start=2)
    step = {"value": 0}
    monkeypatch.setattr(FingerprintModule, "global_step", property(lambda self: step["value"]))
    images = torch.rand(4, 3, 32, 32) * 2 - 1
    seen = []
    for step["value"] in range(4):
        module.training_step({"image": images}, step["value"])
        seen.append(float(module.logged["train/bce_wc"]) > 0)
    assert seen == [False, False, True, True]


def test_wc_rho_ramp_grows_the_radius_linearly_to_wc_rho(monkeypatch):
    module = _module(wc_steps=1, wc_rho=0.01, wc_rho_ramp=4)
    step = {"value": 0}
    monkeypatch.setattr(FingerprintModule, "global_step", property(lambda self: step["value"]))
    radii = []
    perturbation = training.worst_case_perturbation
    monkeypatch.setattr(training, "worst_case_perturbation",
                        lambda weights, grads, rho, **kw: radii.append(rho) or perturbation(weights, grads, rho, **kw))
    images = torch.rand(4, 3, 32, 32) * 2 - 1
    for step["value"] in range(6):
        module.training_step({"image": images}, step["value"])
    assert radii == pytest.approx([0.0025, 0.005, 0.0075, 0.01, 0.01, 0.01])


def test_worst_case_settings_are_checked():
    with pytest.raises(ConfigError, match="wc_ascent"):
        _module(wc_ascent="sam")
    with pytest.raises(ConfigError, match="wc_every"):
        _module(wc_every=0)
    with pytest.raises(ConfigError, match="wc_start"):
        _module(wc_start=-1)
    with pytest.raises(ConfigError, match="wc_rho_ramp"):
        _module(wc_rho_ramp=1.5)
