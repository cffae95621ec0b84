"""Attacks as plug-ins (conf/attacks/): registration rules, the shipped example, and the one-line
error for a plug-in that cannot be built."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from hydra.errors import InstantiationException
from omegaconf import OmegaConf

from fingerprint_lm.attacks.cases import BUILTIN_ATTACKS, image_case, parse_case, register_image_attack
from fingerprint_lm.attacks.image import IMAGE_ATTACKS
from fingerprint_lm.attacks.plugins import median_filter
from fingerprint_lm.errors import ConfigError
from fingerprint_lm.tasks.wrapper import one_line_config_error, register_attack_plugins
from tests.conftest import ROOT


@pytest.fixture
def plugins():
    """The registered plug-ins are removed again: other tests see the built-in table."""
    yield
    for name in set(IMAGE_ATTACKS) - BUILTIN_ATTACKS:
        del IMAGE_ATTACKS[name]


def invert(images, strength, generator=None):
    return -images * float(strength)


def test_a_registered_attack_is_a_case_like_a_built_in_one(plugins):
    with pytest.raises(ConfigError, match="unknown attack case 'invert_s1'"):
        parse_case("invert_s1")
    register_image_attack("invert", invert)
    assert parse_case("invert_s1") == ("invert", 1.0, 1)
    images = torch.rand(2, 3, 8, 8) * 2 - 1
    assert torch.equal(image_case("invert_s1")(images), -images)
    with pytest.raises(ConfigError, match="needs a strength"):
        parse_case("invert")
    with pytest.raises(ConfigError, match="colluders must be 1"):
        parse_case("invert_s1_c2")


@pytest.mark.parametrize(
    ("name", "attack", "message"),
    [
        ("jpeg", invert, "is built in"),
        ("average", invert, "is built in"),
        ("my_q50", invert, "none of them a strength"),
        ("blur_c2", invert, "none of them a strength"),
        ("Median", invert, "lowercase words"),
        ("median", 3, "not callable"),
    ],
)
def test_registration_refuses_names_that_would_clash_or_not_parse(plugins, name, attack, message):
    with pytest.raises(ConfigError, match=message):
        register_image_attack(name, attack)
    assert set(IMAGE_ATTACKS) <= BUILTIN_ATTACKS


def test_the_config_group_registers_instantiated_plugins(plugins):
    cfg = OmegaConf.create({"attacks": {"image": {
        "median": {"_target_": "fingerprint_lm.attacks.plugins.median_filter", "_partial_": True}}}})
    register_attack_plugins(cfg)
    register_attack_plugins(cfg)  # every task registers anew: a plug-in may replace itself
    images = torch.rand(1, 3, 12, 12) * 2 - 1
    assert torch.equal(image_case("median_s3")(images), median_filter(images, 3))


def test_median_filter_removes_isolated_outliers_and_keeps_flat_images():
    flat = torch.full((1, 3, 9, 9), 0.25)
    assert torch.equal(median_filter(flat, 3), flat)
    salted = flat.clone()
    salted[0, :, 4, 4] = 1.0  # one bright pixel: the 3x3 median of its window is the background
    assert torch.equal(median_filter(salted, 3), flat)
    assert torch.equal(median_filter(salted, 1), salted)
    ramp = torch.linspace(-1, 1, 9).repeat(1, 3, 9, 1)  # a monotone edge survives (reflected borders aside)
    assert torch.allclose(median_filter(ramp, 3)[..., 1:-1], ramp[..., 1:-1])
    for bad in (2, 0, 2.5):
        with pytest.raises(ConfigError, match="odd window size"):
            median_filter(flat, bad)


def test_a_plugin_that_cannot_be_built_is_a_one_line_config_error(plugins):
    cfg = OmegaConf.create({"attacks": {"image": {"nope": {"_target_": "no_such_module.attack", "_partial_": True}}}})
    with pytest.raises(InstantiationException) as caught:
        register_attack_plugins(cfg)
    error = one_line_config_error(caught.value)  # what run_task raises, printed as `error: ...`
    assert isinstance(error, ConfigError) and "no_such_module" in str(error) and "\n" not in str(error)


@pytest.mark.slow  # the same through the CLI: a fresh interpreter imports torch and Hydra
def test_a_plugin_that_cannot_be_built_is_one_error_line(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "fingerprint_lm", "task=users", f"paths.root_dir={tmp_path}", "logger=none",
         "+attacks.image.nope={_target_:no_such_module.attack,_partial_:true}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), out.stderr
    assert "no_such_module" in lines[0]
