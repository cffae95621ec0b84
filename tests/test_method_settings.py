"""A method's nested settings (``method.train``, ``method.pnm``, ``method.augment``, the readers'
settings in ``method.extractor``) are checked when Hydra builds the method, in one place each
(lit/training_settings.py, models/augment.py, the decoder's and readers' keyword names): a misspelt
key or a value out of range is a ConfigError that names it, before any training starts, and the
shipped methods' own settings all pass."""

from __future__ import annotations

import pytest

from fingerprint_lm.errors import ConfigError
from fingerprint_lm.lit.fingerprinting import FingerprintModule
from fingerprint_lm.lit.training_settings import TrainingSettings
from fingerprint_lm.methods.content_reader import check_readout_attack_resolution
from fingerprint_lm.models.pnm import PersonalizedDecoder
from fingerprint_lm.models.pooled_extractor import BandEnergyExtractor
from fingerprint_lm.models.vae import build_vae
from fingerprint_lm.tasks.train import method_from_config, train_from_config
from tests.conftest import compose_config

BAD_SETTINGS = [  # (override, words the error must hold)
    ("+method.train.lrr=1", "method.train has no setting 'lrr' (known: lr,"),
    ("method.train.lr=-1", "method.train.lr must be a finite number > 0"),
    ("method.train.decoder_lr=0", "method.train.decoder_lr must be a finite number > 0"),
    ("method.train.lr_warmdown_fraction=1.5",
     "method.train.lr_warmdown_fraction must be a finite number >= 0 and <= 1"),
    ("method.train.wc_steps=-1", "method.train.wc_steps must be an integer >= 0"),
    ("method.train.wc_ascent=bogus", "method.train.wc_ascent must be one of exact, reuse, lagged"),
    ("method.train.train_decoder=maybe", "method.train.train_decoder must be true or false"),
    ("method.train.psnr_target=abc", "method.train.psnr_target must be a finite number > 0, got 'abc'"),
    ("+method.pnm.mapping_hiden=3", "method.pnm has no setting 'mapping_hiden'"),
    ("method.pnm.mapping_hidden=0", "method.pnm.mapping_hidden must be a positive integer"),
    ("method.pnm.modulation_bound=-1", "method.pnm.modulation_bound must be a finite number > 0"),
    ("method.pnm.conv_sites=conv_in", "method.pnm.conv_sites must be a list of module names"),
    ("+method.extractor.band_energy.filtersize=5", "method.extractor.band_energy has no setting 'filtersize'"),
    ("+method.extractor.tiled.width=5", "method.extractor has no setting 'tiled'"),
    ("method.augment.p_blur=2", "method.augment.p_blur must be a finite number >= 0 and <= 1"),
    ("method.augment.jpeg_quality=[90,50]", "method.augment.jpeg_quality[1] must be a finite number >= 90"),
    ("method.augment.noise_std=[0.1]", "method.augment.noise_std must be [low, high]"),
    ("+method.augment.p_rotate=0.5", "method.augment has no setting 'p_rotate'"),
    ("method.second_cycle=5", "method.second_cycle must be a mapping {steps: N, train: {...}} (or a list of them) "
                              "or null, got 5"),
    ("+method.second_cycle.stepz=3", "method.second_cycle has no setting 'stepz' (known: steps, train, read_with)"),
    ("method.second_cycle={steps:0}", "method.second_cycle.steps must be a positive integer, got 0"),
    ("method.second_cycle={steps:5,train:{lr:-1}}", "method.second_cycle.train.lr must be a finite number > 0"),
    ("method.second_cycle={steps:5,read_with:band}",
     "method.second_cycle.read_with must be one of extractor, content_reader, got 'band'"),
    ("method.second_cycle=[]", "method.second_cycle is an empty list: null for no second cycle"),
    ("method.second_cycle=[{steps:5},{steps:0}]", "method.second_cycle[1].steps must be a positive integer, got 0"),
    ("method.second_cycle=[{steps:5},7]", "method.second_cycle[1] must be a mapping"),
    ("method.shipped_second_cycle=[{steps:5,train:{lrr:1}}]",
     "method.shipped_second_cycle[0].train has no setting 'lrr'"),
    ("method.issue_screen=5", "method.issue_screen must be a mapping {keep, min_psnr} or null, got 5"),
    ("+method.issue_screen.kep=0.5", "method.issue_screen has no setting 'kep'"),
    ("method.issue_screen.keep=0", "method.issue_screen.keep must be a finite number <= 1 and > 0, got 0"),
    ("method.issue_screen.min_psnr=null", "method.issue_screen.min_psnr must be a finite number > 0, got None"),
    ("method.issue_screen.candidates=0", "method.issue_screen.candidates must be a positive integer"),
    ("method.content_reader=5", "method.content_reader must be a mapping {train_images, ...} or null, got 5"),
    ("+method.content_reader.images=5", "method.content_reader: unknown key(s) images (known: train_images,"),
    ("method.content_reader.steps=0", "method.content_reader.steps must be a positive integer, got 0"),
    ("method.content_reader.seed=-1", "method.content_reader.seed must be an integer >= 0, got -1"),
    ("method.content_reader.attack_weight=-1", "method.content_reader.attack_weight must be a finite number >= 0"),
    ("method.extractor.kind=pooled", "method.content_reader reads the band reader's filters"),
]


@pytest.mark.parametrize(("override", "words"), BAD_SETTINGS, ids=[case[0] for case in BAD_SETTINGS])
def test_a_bad_method_setting_is_refused_when_the_method_is_built(tmp_path, override, words):
    with pytest.raises(ConfigError) as caught:
        method_from_config(compose_config(tmp_path, ["method=pnm", override], tiny=False))
    assert words in str(caught.value)


def test_a_cycle_read_by_the_content_reader_needs_one(tmp_path):
    overrides = ["method=pnm", "method.content_reader=null", "method.second_cycle={steps:5,read_with:content_reader}"]
    with pytest.raises(ConfigError, match="read_with=content_reader needs method.content_reader"):
        method_from_config(compose_config(tmp_path, overrides, tiny=False))


def test_the_carrier_readers_settings_are_checked_too(tmp_path):
    with pytest.raises(ConfigError, match="method.extractor has no setting 'cnn_channel'"):
        method_from_config(compose_config(tmp_path, ["method=carrier", "+method.extractor.cnn_channel=[8]"],
                                          tiny=False))


@pytest.mark.parametrize("method", ["pnm", "carrier", "wouaf", "stable_signature"])
def test_every_shipped_method_passes_its_own_checks(tmp_path, method):
    built = method_from_config(compose_config(tmp_path, [f"method={method}"], tiny=False))
    if built.trains_shared_modules:  # the dataclass holds exactly what the YAML wrote, the rest defaults
        settings = TrainingSettings(**built.train)
        assert {name: getattr(settings, name) for name in built.train} == built.train


def test_the_module_names_a_misspelt_keyword_in_one_config_error():
    vae = build_vae()
    pnm = PersonalizedDecoder(vae.decoder, 8, mapping_hidden=16)
    with pytest.raises(ConfigError, match="FingerprintModule has no setting 'wc_rhoo'"):
        FingerprintModule(vae, pnm, BandEnergyExtractor(8), wc_rhoo=0.1)
    module = FingerprintModule(vae, pnm, BandEnergyExtractor(8), wc_rho=0.02, wc_ascent="lagged")
    assert (module.wc_rho, module.wc_ascent, module.lr) == (0.02, "lagged", TrainingSettings().lr)


def test_a_readout_trained_under_attacks_on_images_too_small_for_them_is_refused_before_training(tmp_path):
    """shift_8 leaves side - 8 px and the reader needs 7: a 12 px run is refused before it trains,
    not after (the content reader is fitted last); the 16 px debug run and the shipped 32 px pass;
    a wider filter needs wider images."""
    reader = ("method.content_reader={unmarked_images: 64, train_images: 64, calibration_images: 64, steps: 2, "
              "seed: 1, attack_weight: 0.25}")
    cfg = compose_config(tmp_path, ["method=pnm", reader, "data.resolution=12"])
    with pytest.raises(ConfigError, match="needs images of at least 15 px; data.resolution is 12"):
        train_from_config(cfg, None, None, None)
    method = method_from_config(cfg)
    for resolution in (15, 16, 32):
        check_readout_attack_resolution(method, resolution)
    wider = method_from_config(compose_config(tmp_path, ["method=pnm", reader,
                                                         "method.extractor.band_energy.filter_size=9"]))
    with pytest.raises(ConfigError, match="needs images of at least 17 px; data.resolution is 16"):
        check_readout_attack_resolution(wider, 16)
