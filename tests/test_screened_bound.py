"""The false-accusation bound for a registry of screened codes (registry/store.py: screened draws;
distributor/attribution.py: the pass-rate correction): the registry counts the codes a screen drew
in the same transaction as the row it registers, and attribution and tracing of a screened
registry test at ``fpr x pass rate`` and state p-values divided by the rate, so an image a uniform
registry would accuse by a margin smaller than the rate is not accused."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from fingerprint_lm.distributor.attribution import attribute_images, trace_images
from fingerprint_lm.distributor.issue_screens import _SCREENED, screened_codes
from fingerprint_lm.distributor.read_predictor import predicted_keeps_reads, recorded_predictor
from fingerprint_lm.distributor.screening import ProbeReader, bound_pass_rate
from fingerprint_lm.errors import ConfigError, RegistryError
from fingerprint_lm.evaluation import collusion
from fingerprint_lm.models.checkpoint import load_fingerprint_model, shipped_checkpoint
from fingerprint_lm.registry.index import CodeIndex
from fingerprint_lm.registry.store import Registry
from fingerprint_lm.report.tables import comparison_lines

K = 48


class _FixedReader(torch.nn.Module):
    """Logits that a test sets per image: image ``i`` (its first pixel holds ``i``) reads row ``i``."""

    fingerprint_bits = K

    def __init__(self, logits: np.ndarray) -> None:
        super().__init__()
        self.register_buffer("table", torch.as_tensor(logits, dtype=torch.float64))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.table[images[:, 0, 0, 0].round().long()]


def _registry(path, rng, screened_draws: int | None) -> tuple[Registry, np.ndarray]:
    registry = Registry(path, K)
    codes = rng.integers(0, 2, (50, K), dtype=np.uint8)
    for i, code in enumerate(codes):
        registry.register(f"u{i}", code, screened_draws=screened_draws)
    return registry, codes


def uniform_codes_index(codes: np.ndarray) -> CodeIndex:
    return CodeIndex.from_bits([f"u{i}" for i in range(len(codes))], codes)


def test_the_registry_counts_screened_draws_with_the_row_it_registers(tmp_path):
    rng = np.random.default_rng(0)
    with Registry(tmp_path / "r.sqlite", K) as registry:
        registry.register("plain", rng.integers(0, 2, K, dtype=np.uint8))
        assert registry.screen_pass_rate() is None  # no screened code: uniform codes, no correction
        registry.register("a", rng.integers(0, 2, K, dtype=np.uint8), screened_draws=3)
        code_b = rng.integers(0, 2, K, dtype=np.uint8)
        registry.register("b", code_b, screened_draws=1)
        assert registry.screen_pass_rate() == pytest.approx(2 / 4)
        with pytest.raises(RegistryError, match="same code"):  # refused: nothing counted either
            registry.register("c", code_b, screened_draws=5)
        for bad in (0, True, 2.5, "3"):
            with pytest.raises(RegistryError, match="screened_draws"):
                registry.register("d", rng.integers(0, 2, K, dtype=np.uint8), screened_draws=bad)
        assert registry.screen_pass_rate() == pytest.approx(2 / 4) and len(registry) == 3
    with Registry(tmp_path / "r.sqlite", K) as reopened:  # the count is in the file
        assert reopened.screen_pass_rate() == pytest.approx(0.5)


def test_attribution_of_a_screened_registry_divides_p_values_by_the_pass_rate(tmp_path):
    rng = np.random.default_rng(1)
    screened, codes = _registry(tmp_path / "s.sqlite", rng, screened_draws=4)  # pass rate 1/4
    uniform, _ = _registry(tmp_path / "u.sqlite", np.random.default_rng(1), screened_draws=None)
    # user 3's code under noise strong enough that its p-values span the thresholds below
    logits = (2.0 * codes[3] - 1.0) * 0.6 + rng.normal(0.0, 1.0, (40, K))
    reader = _FixedReader(logits)
    images = [(f"img{i}", torch.full((3, 16, 16), float(i))) for i in range(len(logits))]
    with screened, uniform:
        assert screened.screen_pass_rate() == pytest.approx(0.25)
        plain = attribute_images(reader, uniform, images, fpr=1e-3)
        p_plain = np.array([row["p_value"] for row in plain["images"]])
        # an fpr between an image's plain p-value and 4x it: accused by the uniform registry, not the screened one
        borderline = int(np.argmin(np.abs(np.log(p_plain) - np.log(2e-3))))
        fpr = 2.0 * p_plain[borderline]
        plain, corrected = (attribute_images(reader, reg, images, fpr=fpr) for reg in (uniform, screened))
    assert corrected["screen_pass_rate"] == pytest.approx(0.25) and plain["screen_pass_rate"] == 1.0
    assert corrected["fpr"] == fpr and corrected["uniform_code_fpr"] == pytest.approx(fpr / 4)
    for a, b in zip(plain["images"], corrected["images"], strict=True):
        assert b["p_value"] == pytest.approx(min(1.0, a["p_value"] * 4))
        assert b["accused"] == (b["p_value"] <= fpr)
    assert plain["images"][borderline]["accused"] and not corrected["images"][borderline]["accused"]
    assert sum(r["accused"] for r in corrected["images"]) < sum(r["accused"] for r in plain["images"])
    # the rate may be given for a bare index too, and a bad one is refused
    uniform_index = uniform_codes_index(codes)
    index_read = attribute_images(reader, uniform_index, images, fpr=fpr, screen_pass_rate=0.25)
    assert [r["p_value"] for r in index_read["images"]] == [r["p_value"] for r in corrected["images"]]
    with pytest.raises(ConfigError, match="screen_pass_rate"):
        attribute_images(reader, uniform_index, images, fpr=fpr, screen_pass_rate=0.0)


def test_tracing_of_a_screened_registry_states_bounds_divided_by_the_pass_rate(tmp_path):
    rng = np.random.default_rng(2)
    codes = rng.integers(0, 2, (50, K), dtype=np.uint8)
    logits = (2.0 * codes[5] - 1.0) * 0.8 + rng.normal(0.0, 1.0, (8, K))
    images = [(f"img{i}", torch.full((3, 16, 16), float(i))) for i in range(len(logits))]
    reader, index = _FixedReader(logits), uniform_codes_index(codes)
    plain = trace_images(reader, index, images, fpr=1e-6)
    corrected = trace_images(reader, index, images, fpr=1e-6, screen_pass_rate=0.5)
    assert corrected["fpr"] == 1e-6 and corrected["uniform_code_fpr"] == pytest.approx(5e-7)
    assert corrected["suspects"][0]["user_id"] == plain["suspects"][0]["user_id"] == "u5"
    assert corrected["threshold"] >= plain["threshold"]  # a stricter test for the same stated fpr
    by_user = {s["user_id"]: s["p_value_bound"] for s in plain["suspects"]}
    assert corrected["suspects"][0]["p_value_bound"] < 1.0  # a bound the check below can double
    for suspect in corrected["suspects"]:
        assert suspect["p_value_bound"] == pytest.approx(min(1.0, by_user[suspect["user_id"]] * 2))


def test_the_task_divides_by_the_registrys_count_or_the_fitted_rate_whichever_is_smaller():
    fitted = {"pass_rate": 0.375, "min_probe_bit_acc": 0.93}
    assert bound_pass_rate(None, fitted) is None  # nothing screened: uniform codes, no correction
    assert bound_pass_rate(1.0, fitted) == 0.375  # one user whose first draw passed does not read 1
    assert bound_pass_rate(0.3, fitted) == 0.3  # a registry that counts it lower is believed
    assert bound_pass_rate(0.5, None) == 0.5 and bound_pass_rate(0.5, {"keep": 0.5}) == 0.5


def test_the_sweep_screens_the_colluders_codes_and_tests_at_fpr_times_the_pass_rate(monkeypatch):
    """The collusion sweep issues a pnm checkpoint's colluders the codes task=issue would (each
    clears the recorded floors on the probe) and attributes and traces them as the distributor
    tests a screened registry; innocents and unscreened draws stay the uniform codes."""
    model = load_fingerprint_model(shipped_checkpoint("embedded_pnm"))
    floors = model.meta["issue_screen"]
    point = collusion.Point("none", "average", None, 2)
    unscreened_settings = collusion.PointSettings(n_images=4, n_innocents=6, screen_codes=False)
    plain = collusion.draw_users(model, point, unscreened_settings, 3)
    screened = collusion.draw_users(model, point, collusion.PointSettings(n_images=4, n_innocents=6), 3)
    assert plain.screen_pass_rate is None and screened.screen_pass_rate == floors["pass_rate"]
    np.testing.assert_array_equal(screened.codes[2:], plain.codes[2:])
    assert not np.array_equal(screened.codes[:2], plain.codes[:2])
    predictor, record = recorded_predictor(model)  # screen_by=auto: the checkpoint records a predictor
    assert predicted_keeps_reads(predictor(screened.codes[:2]), record).all()
    probed = collusion.draw_users(model, point, collusion.PointSettings(n_images=4, n_innocents=6,
                                                                       screen_by="probe"), 3)
    assert probed.screen_pass_rate == floors["pass_rate"]  # the two screens may keep the same codes
    assert {memo[1] for memo in _SCREENED} >= {"predicted", "probe"}  # each screen drew its own codes
    read = ProbeReader(model, floors["probe_images"])
    for code in probed.codes[:2]:
        accuracy, quality = read(code)
        assert accuracy >= floors["min_probe_bit_acc"] and quality >= floors["min_probe_psnr"]
    no_screen = SimpleNamespace(meta={}, issue_predictor={})
    for screen_by in ("auto", "probe", "predicted"):  # a checkpoint that records no screen: uniform codes
        assert screened_codes(no_screen, 2, 3, screen_by) is None
    carrier = load_fingerprint_model(shipped_checkpoint("embedded"))
    predicted_settings = collusion.PointSettings(n_images=4, n_innocents=6, screen_by="predicted")
    assert collusion.draw_users(carrier, point, predicted_settings, 3).screen_pass_rate is None

    tested = []
    for name in ("attribute_logits", "trace_logits"):
        original = getattr(collusion, name)

        def spy(*args, _original=original, _name=name, **kwargs):
            tested.append((_name, kwargs["fpr"]))
            return _original(*args, **kwargs)

        monkeypatch.setattr(collusion, name, spy)
    for screen_codes, rate in ((True, floors["pass_rate"]), (False, 1.0)):
        tested.clear()
        settings = collusion.PointSettings(n_images=4, n_innocents=6, screen_codes=screen_codes)
        result = collusion.evaluate_point(model, point, settings, 3)
        assert result.screen_pass_rate == (floors["pass_rate"] if screen_codes else None)
        assert sorted(tested) == sorted([("attribute_logits", 1e-6 * rate), ("trace_logits", 1e-3 * rate),
                                         ("trace_logits", 1e-3 * rate)])
        method_row = next(line for line in comparison_lines([{**result.as_dict(), "case": "average_c2"}])
                          if line.startswith("| pnm 48-bit"))
        assert (f"screened codes (pass rate {floors['pass_rate']:.3f})" in method_row) == screen_codes


def test_the_sweep_refuses_floors_no_code_clears_and_floors_without_a_pass_rate():
    """One ConfigError that names the sweep's way out, instead of the distributor's settings."""
    model = load_fingerprint_model(shipped_checkpoint("embedded_pnm"))
    model.meta = copy.deepcopy(model.meta)
    model.meta["issue_screen"]["min_probe_bit_acc"] = 1.0
    with pytest.raises(ConfigError, match="no code among 2 draws clears the probe screen.*sweep.screen_codes=false"):
        screened_codes(model, 1, 3, "probe", max_draws=2)
    model.meta["issue_screen"]["predictor"]["min_predicted_psnr"] = 1000.0
    with pytest.raises(ConfigError, match="no code among 2 draws clears the predicted screen.*sweep.screen_codes"):
        screened_codes(model, 1, 3, max_draws=2)  # auto: the recorded predictor
    del model.meta["issue_screen"]["pass_rate"]
    with pytest.raises(ConfigError, match="records floors but no pass_rate"):
        screened_codes(model, 1, 3, "probe")
