"""Attacks as plug-ins (conf/attacks/): registration rules, the shipped example, and the one-line
error for a plug-in that cannot be built."""

from __future__ import annotations

import pytest
import torch
from hydra.errors import InstantiationException
from omegaconf import OmegaConf

from fingerprint_lm.attacks.cases import (
    ATTACK_TABLES,
    BUILTIN_ATTACKS,
    attack_kind,
    image_case,
    parse_case,
    register_attack,
    register_image_attack,
    register_merge,
    register_model_attack,
)
from fingerprint_lm.attacks.image import IMAGE_ATTACKS
from fingerprint_lm.attacks.model import STATE_ATTACKS
from fingerprint_lm.attacks.plugins import median_filter, median_merge
from fingerprint_lm.errors import ConfigError
from fingerprint_lm.evaluation.collusion import Point, PointSettings, evaluate_point
from fingerprint_lm.models.checkpoint import load_fingerprint_model
from fingerprint_lm.report.tables import comparison_lines
from fingerprint_lm.tasks.wrapper import one_line_config_error, register_attacks
from tests.conftest import ROOT
from tests.console import run_console


@pytest.fixture
def plugins():
    """The registered plug-ins are removed again: other tests see the built-in tables."""
    yield
    for table in ATTACK_TABLES.values():
        for name in set(table) - BUILTIN_ATTACKS:
            del table[name]


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
    register_attacks(cfg)
    register_attacks(cfg)  # every task registers anew: a plug-in may replace itself
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
        register_attacks(cfg)
    error = one_line_config_error(caught.value)  # what run_task raises, printed as `error: ...`
    assert isinstance(error, ConfigError) and "no_such_module" in str(error) and "\n" not in str(error)


def test_a_plugin_that_cannot_be_built_is_one_error_line(tmp_path):
    """The same through the console (in this interpreter: tests/console.py)."""
    out = run_console(["task=users", f"paths.root_dir={tmp_path}", "logger=none",
                       "+attacks.image.nope={_target_:no_such_module.attack,_partial_:true}"], cwd=ROOT)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), out.stderr
    assert "no_such_module" in lines[0]


def test_median_merge_is_the_elementwise_median():
    copies = [{"w": torch.tensor([1.0, 5.0, -2.0]), "n": torch.tensor([i])} for i in range(3)]
    copies[1]["w"] = torch.tensor([3.0, 0.0, 4.0])
    copies[2]["w"] = torch.tensor([2.0, 9.0, 1.0])
    merged = median_merge(copies)
    assert torch.equal(merged["w"], torch.tensor([2.0, 5.0, 1.0])) and torch.equal(merged["n"], torch.tensor([0]))
    assert torch.equal(median_merge(copies[:2])["w"], torch.tensor([2.0, 2.5, 1.0]))  # two copies: their mean
    assert torch.equal(copies[0]["w"], torch.tensor([1.0, 5.0, -2.0]))  # inputs untouched
    with pytest.raises(ConfigError, match="at least 2 copies"):
        median_merge(copies[:1])


def test_model_and_merge_plugins_are_cases_of_their_kind(plugins):
    cfg = OmegaConf.create({"attacks": {
        "model": {"keep": {"_target_": "tests.test_attack_plugins.damp", "_partial_": True}},
        "merge": {"median_merge": {"_target_": "fingerprint_lm.attacks.plugins.median_merge", "_partial_": True}},
    }})
    register_attacks(cfg)
    assert parse_case("keep") == ("keep", None, 1) and attack_kind("keep") == "model"
    assert parse_case("median_merge_c3") == ("median_merge", None, 3) and attack_kind("median_merge") == "merge"
    with pytest.raises(ConfigError, match="needs at least 2 colluders"):
        parse_case("median_merge_c1")
    with pytest.raises(ConfigError, match="colluders must be 1"):
        parse_case("keep_c2")
    with pytest.raises(ConfigError, match="is built in"):
        register_merge("average", median_merge)
    register_image_attack("keep", invert)  # a plug-in's name may change kind: it leaves its old table
    assert attack_kind("keep") == "image" and "keep" not in STATE_ATTACKS


DAMP_CALLS: list[float] = []


def damp(state_dict, strength, generator=None):
    """Every floating-point tensor times (1 - strength): a model attack the images show."""
    DAMP_CALLS.append(strength)
    return {k: v * (1 - strength) if v.is_floating_point() else v.clone() for k, v in state_dict.items()}


def drop_a_key(state_dict, strength, generator=None):
    return dict(list(state_dict.items())[1:])


def test_plugins_run_through_a_sweep_point(plugins, tiny_checkpoint):
    """A model plug-in changes the copy the point scores; the median of two copies is their mean,
    so it scores as the built-in 2-party average; a plug-in that returns other keys is refused."""
    model = load_fingerprint_model(tiny_checkpoint)
    register_model_attack("damp", damp)
    register_merge("median_merge", median_merge)
    register_model_attack("lossy", drop_a_key)
    settings = PointSettings(n_images=16, n_innocents=50)

    def score(act, case):
        result = evaluate_point(model, Point.from_case(act, case), settings, 0).as_dict()
        return {k: result[k] for k in ("bit_acc", "psnr", "attribution_acc", "tracing_caught")}, result["attack_kind"]

    DAMP_CALLS.clear()
    clean, damped = score("none", "none_c1")[0], score("none", "damp_0.5")
    assert DAMP_CALLS == [0.5] and damped[1] == "model" and damped[0] != clean  # the copy the point scored changed
    assert score("none", "damp_0") == (clean, "model")
    assert score("all", "median_merge_c2") == (score("all", "average_c2")[0], "merge")
    with pytest.raises(ConfigError, match="attack plug-in 'lossy' changed the state dict's keys"):
        score("none", "lossy")


def test_a_failed_registration_keeps_the_plugin_and_one_name_is_one_kind(plugins):
    register_image_attack("foo", median_filter)
    with pytest.raises(ConfigError, match="not callable"):
        register_image_attack("foo", 3)
    assert parse_case("foo_s3") == ("foo", 3.0, 1)
    spec = {"_target_": "fingerprint_lm.attacks.plugins.median_merge", "_partial_": True}
    cfg = OmegaConf.create({"attacks": {
        "image": {"bar": {**spec, "_target_": "fingerprint_lm.attacks.plugins.median_filter"}},
        "merge": {"bar": spec}}})
    with pytest.raises(ConfigError, match="'bar' is both attacks.image and attacks.merge"):
        register_attacks(cfg)


def test_a_summary_files_a_plugin_under_the_kind_its_point_recorded():
    """report.summarize runs in a process where the sweep's plug-ins are not registered: the kind
    each point recorded files them (rows from before points recorded it fall back to the name)."""
    base = {"method": "pnm", "fingerprint_bits": 48, "act": "all", "colluders": 1, "psnr": 30.0}
    rows = [{**base, "attack": "none", "bit_acc": 0.9, "attack_kind": "none"},
            {**base, "attack": "median", "case": "median_s3", "bit_acc": 0.6, "attack_kind": "image"},
            {**base, "attack": "jpeg", "case": "jpeg_q50", "bit_acc": 0.8}]
    line = next(line for line in comparison_lines(rows) if line.startswith("| pnm 48-bit"))
    assert "| 0.700 / 0.600 (median_s3) |" in line


def test_the_attacks_group_names_every_built_in_by_its_target(plugins, default_cfg):
    """conf/attacks/default.yaml lists each attack of one signature under its kind; registering
    the group leaves the tables as they were, and a built-in name cannot point elsewhere."""
    listed = {kind: set(default_cfg.attacks[kind]) for kind in ATTACK_TABLES}
    assert listed == {kind: set(table) for kind, table in ATTACK_TABLES.items()}
    before = {kind: dict(table) for kind, table in ATTACK_TABLES.items()}
    register_attacks(default_cfg)
    assert {kind: dict(table) for kind, table in ATTACK_TABLES.items()} == before
    for kind, name, other in (("image", "jpeg", "fingerprint_lm.attacks.image.crop"),
                              ("model", "jpeg", "fingerprint_lm.attacks.image.jpeg"),
                              ("merge", "average", "fingerprint_lm.attacks.collusion.max_abs")):
        cfg = OmegaConf.create({"attacks": {kind: {name: {"_target_": other, "_partial_": True}}}})
        with pytest.raises(ConfigError, match=f"{name!r} is built in"):
            register_attacks(cfg)
    assert {kind: dict(table) for kind, table in ATTACK_TABLES.items()} == before


def first_colluder(outputs, generator=None):
    return outputs[0].clone()


def test_an_image_merge_plugin_is_an_image_collusion_case(plugins, tiny_checkpoint):
    """An image collusion of one's own: the suspect images are the first colluder's, so each is
    attributed to a colluder (a blend of two is not); a wrong shape is refused."""
    cfg = OmegaConf.create({"attacks": {"image_merge": {
        "first": {"_target_": "tests.test_attack_plugins.first_colluder", "_partial_": True}}}})
    register_attacks(cfg)
    assert parse_case("first_c3") == ("first", None, 3) and attack_kind("first") == "image_collusion"
    model = load_fingerprint_model(tiny_checkpoint)
    settings = PointSettings(n_images=8, n_innocents=20)
    first = evaluate_point(model, Point.from_case("all", "first_c2"), settings, 0).as_dict()
    blend = evaluate_point(model, Point.from_case("all", "image_blend_c2"), settings, 0).as_dict()
    assert first["attack_kind"] == "image_collusion"
    # every image carries one full code (a clean copy's images are attributed at > 0.8 on this model,
    # tests/test_sweep.py); a blend of two codes is not attributed
    assert first["attribution_acc"] > 0.8 and first["attribution_acc"] > blend["attribution_acc"]
    register_attack("image_merge", "first", lambda outputs, generator=None: outputs[0][:1])
    with pytest.raises(ConfigError, match="image collusion plug-in 'first' must return one batch"):
        evaluate_point(model, Point.from_case("all", "first_c2"), settings, 0)
