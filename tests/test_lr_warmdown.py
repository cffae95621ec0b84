"""The learning-rate warm-down (FingerprintModule ``lr_warmdown_fraction``): constant rates, then a linear
fall to 0 over a run's last steps, applied to both optimizer groups in a real Lightning fit."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from fingerprint_lm.errors import ConfigError
from fingerprint_lm.lit.fingerprinting import FingerprintModule
from fingerprint_lm.methods.pnm import PNMMethod
from fingerprint_lm.models.pnm import PersonalizedDecoder
from fingerprint_lm.models.pooled_extractor import BandEnergyExtractor
from fingerprint_lm.models.vae import build_vae
from tests.test_rewhitening import NO_AUGMENT, unmarked
from tests.test_training import _module


class RecordRates(L.Callback):
    def __init__(self):
        self.rates: list[list[float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.rates.append([group["lr"] for group in trainer.optimizers[0].param_groups])


def fit(module: FingerprintModule, images: torch.Tensor, callback: L.Callback, max_steps: int = 6) -> None:
    """A real Lightning fit of ``max_steps`` steps over ``images``, two at a time."""
    loader = torch.utils.data.DataLoader([{"image": image} for image in images], batch_size=2)
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[callback],
                        limit_val_batches=0)
    trainer.fit(module, train_dataloaders=loader)


def band_reader_module(fraction: float, reader: str) -> FingerprintModule:
    """A module around the default tiny VAE whose band reader's filters train."""
    torch.manual_seed(6)
    vae = build_vae()
    return FingerprintModule(vae, PersonalizedDecoder(vae.decoder, 8, mapping_hidden=16),
                             BandEnergyExtractor(8, learn_filters=True), augment=NO_AUGMENT, wc_steps=0,
                             lr_warmdown_fraction=fraction, warmdown_reader=reader)


def fit_rates(lr_warmdown_fraction: float) -> list[float]:
    """Each step's two rates (shared modules, then decoder), flattened."""
    module = _module(wc_steps=0, lr=1e-3, train_decoder=True, decoder_lr=4e-4,
                     lr_warmdown_fraction=lr_warmdown_fraction)
    recorder = RecordRates()
    fit(module, torch.rand(8, 3, 32, 32) * 2 - 1, recorder)
    return [rate for step in recorder.rates for rate in step]


def test_rates_stay_constant_then_fall_linearly_to_zero_over_the_last_steps():
    rates = fit_rates(lr_warmdown_fraction=4 / 6)  # the last 4 of 6 steps
    factors = [1.0, 1.0, 1.0, 0.75, 0.5, 0.25]  # the step taken at global step g uses min(1, (6 - g) / 4)
    assert rates == pytest.approx([rate for f in factors for rate in (1e-3 * f, 4e-4 * f)])


def test_no_warmdown_keeps_the_configured_rates():
    assert fit_rates(lr_warmdown_fraction=0) == pytest.approx([1e-3, 4e-4] * 6)


def test_a_warmdown_fraction_outside_0_1_is_refused():
    for fraction in (-0.1, 1.5):
        with pytest.raises(ConfigError, match="lr_warmdown_fraction"):
            _module(wc_steps=0, lr_warmdown_fraction=fraction)


def test_a_frozen_warmdown_reader_is_rewhitened_once_and_then_stays_fixed():
    """With ``warmdown_reader`` frozen the reader's filters train until the warm-down, are
    re-whitened once on the held unmarked outputs when it starts, and do not move after."""
    module = band_reader_module(0.5, "frozen")
    module.whitening_outputs = unmarked(64)
    refreshed = []
    refresh = module.refresh_whitening
    module.refresh_whitening = lambda: refreshed.append(module.extractor.weight.detach().clone()) or refresh()
    recorder = RecordRates()
    filters = []
    recorder.on_train_batch_end = lambda trainer, *a: filters.append(module.extractor.weight.detach().clone())
    fit(module, unmarked(16), recorder)
    assert len(refreshed) == 1 and torch.equal(refreshed[0], filters[2])  # before the 4th of 6 steps
    assert not torch.equal(filters[0], filters[2])  # trained before
    assert all(torch.equal(f, filters[2]) for f in filters[3:])  # frozen after


@pytest.mark.parametrize(("fraction", "reader", "holds"), [(0.25, "frozen", True), (0.25, "trained", False),
                                                           (0.0, "frozen", False)])
def test_pnm_holds_the_unmarked_outputs_only_for_a_reader_that_freezes(fraction, reader, holds):
    """prepare_training decodes the whitening outputs when the warm-down will re-whiten on them."""
    method = PNMMethod(name="pnm", steps=1, extractor={"kind": "band_energy"}, detector_fit_samples=16)
    module = band_reader_module(fraction, reader)
    method.prepare_training(module, [{"image": unmarked(16)}])
    assert (module.whitening_outputs is not None) == holds
    if holds:
        assert module.whitening_outputs.shape == (16, 3, 32, 32)
