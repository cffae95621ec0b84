"""A band reader whose filters train is re-whitened during training (FingerprintModule
``rewhiten_every``), so the whitening fitted after training matches the one training optimised
against."""

from __future__ import annotations

import torch

import fingerprint_lm.methods.pnm as pnm_method
from fingerprint_lm.data.synthetic import ProceduralImages
from fingerprint_lm.lit.fingerprinting import FingerprintModule
from fingerprint_lm.models.augment import AugmentConfig
from fingerprint_lm.models.pnm import PersonalizedDecoder
from fingerprint_lm.models.pooled_extractor import BandEnergyExtractor
from fingerprint_lm.models.vae import build_vae

NO_AUGMENT = AugmentConfig(p_noise=0, p_blur=0, p_jpeg=0, p_crop=0, p_brightness=0)


def unmarked(count: int) -> torch.Tensor:
    data = ProceduralImages(resolution=32, seed=9, length=count)
    return torch.stack([data.sample(i)["image"] for i in range(count)])


def module_with_learned_reader(rewhiten_every: int) -> FingerprintModule:
    torch.manual_seed(6)
    vae = build_vae()
    pnm = PersonalizedDecoder(vae.decoder, 8, mapping_hidden=16)
    extractor = BandEnergyExtractor(8, learn_filters=True)
    module = FingerprintModule(vae, pnm, extractor, augment=NO_AUGMENT, wc_steps=0, rewhiten_every=rewhiten_every)
    optimizer = module.configure_optimizers()
    module.optimizers = lambda: optimizer
    module.manual_backward = lambda loss: loss.backward()
    module.log_dict = module.log = lambda *a, **kw: None
    return module


def test_refresh_whitening_whitens_the_current_filters():
    """After the filters move, the refreshed whitening gives median-0, unit-variance,
    decorrelated logits (times the gain) on the unmarked outputs again; the stale one does not."""
    module = module_with_learned_reader(rewhiten_every=1)
    module.whitening_outputs = unmarked(512)
    module.refresh_whitening()
    with torch.no_grad():
        module.extractor.weight.add_(0.3 * torch.randn_like(module.extractor.weight))
        stale = module.extractor(module.whitening_outputs) / module.extractor.gain
        module.refresh_whitening()
        fresh = module.extractor(module.whitening_outputs) / module.extractor.gain
    assert fresh.median(0).values.abs().max() < 1e-3
    assert torch.allclose(torch.cov(fresh.T), torch.eye(8), atol=0.02)
    assert not torch.allclose(torch.cov(stale.T), torch.eye(8), atol=0.1)


def test_training_refreshes_the_whitening_every_nth_step(monkeypatch):
    module = module_with_learned_reader(rewhiten_every=3)
    module.whitening_outputs = unmarked(64)
    step = {"value": 0}
    monkeypatch.setattr(FingerprintModule, "global_step", property(lambda self: step["value"]))
    calls = []
    refresh = module.refresh_whitening
    monkeypatch.setattr(module, "refresh_whitening", lambda: calls.append(step["value"]) or refresh())
    batch = {"image": unmarked(4)}
    for step["value"] in range(7):
        module.training_step(batch, step["value"])
    assert calls == [0, 3, 6]
    module.whitening_outputs = None  # nothing to whiten on (resume before the method set it): no refresh
    module.training_step(batch, 9)
    assert calls == [0, 3, 6]


def test_after_fit_whitens_on_the_outputs_training_rewhitened_on(monkeypatch):
    """With ``rewhiten_every`` on, after_fit re-fits on the held unmarked outputs instead of
    decoding the loader's images again, and then lets them go; without them it decodes."""
    method = pnm_method.PNMMethod(name="pnm", steps=1, extractor={"kind": "band_energy"}, detector_fit_samples=16)
    module = module_with_learned_reader(rewhiten_every=5)
    loader = [{"image": unmarked(16)}]
    decoded = []
    monkeypatch.setattr(pnm_method, "whiten", lambda module, images: decoded.append(len(images)))
    method.prepare_training(module, loader)
    assert module.whitening_outputs.shape == (16, 3, 32, 32)
    module.extractor.weight.data.add_(0.3)  # the filters moved during training
    method.after_fit(module, loader)
    assert decoded == [] and module.whitening_outputs is None
    with torch.no_grad():
        logits = module.extractor(pnm_method.unmarked_outputs(module, loader[0]["image"])) / module.extractor.gain
    assert logits.median(0).values.abs().max() < 1e-3  # whitened for the moved filters
    method.after_fit(module, loader)
    assert decoded == [16]
