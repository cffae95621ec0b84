"""The predicted code screen (distributor/read_predictor.py): a ridge regression on a code's signs and
their pairwise products recovers a read that is a quadratic function of the code, its thresholds pass
the probe floors' share of fresh codes, the codes it keeps read better than uniform ones, the fit
travels inside the checkpoint's safetensors, and task=issue screens with it when told to."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import numpy as np
import pytest

from fingerprint_lm.distributor.issue_screens import choose_screen
from fingerprint_lm.distributor.read_predictor import (
    PredictedScreen,
    ReadPredictor,
    check_predictor_codes,
    fit_read_predictor,
    pair_features,
    recorded_predictor,
    with_read_predictor,
)
from fingerprint_lm.distributor.screening import bound_pass_rate
from fingerprint_lm.errors import CheckpointError, ConfigError
from fingerprint_lm.models.checkpoint import load_fingerprint_model, save_fingerprint_model, shipped_checkpoint
from fingerprint_lm.registry.store import Registry
from fingerprint_lm.tasks.train import _with_predictor
from tests.console import run_console

BITS = 12


class QuadraticReader:
    """A stand-in for ProbeReader whose 'probe read' is a fixed quadratic function of the code's
    signs plus read noise: bit accuracy around 0.93, PSNR around 30 dB."""

    def __init__(self, seed: int = 0, noise: float = 0.002) -> None:
        rng = np.random.default_rng(seed)
        self.model = SimpleNamespace(fingerprint_bits=BITS)
        self.pairs = rng.normal(0, 0.004, (BITS, BITS))
        self.quality = rng.normal(0, 0.2, BITS)
        self.rng, self.noise = np.random.default_rng(seed + 1), noise

    def truth(self, code: np.ndarray) -> tuple[float, float]:
        signs = 2.0 * code - 1.0
        return 0.93 + float(signs @ np.triu(self.pairs, 1) @ signs), 30.0 + float(self.quality @ signs) / 4

    def __call__(self, code: np.ndarray) -> tuple[float, float]:
        accuracy, quality = self.truth(code)
        return accuracy + self.rng.normal(0, self.noise), quality + self.rng.normal(0, 0.05)


def test_pair_features_are_the_signs_then_every_product_of_two():
    features = pair_features(np.array([[1, 0, 1]], dtype=np.uint8))
    assert features.tolist() == [[1.0, -1.0, 1.0, -1.0, 1.0, -1.0]]  # s0 s1 s2, s0s1 s0s2 s1s2


def test_the_fit_recovers_a_quadratic_read_and_its_screen_passes_the_probes_share():
    reader = QuadraticReader()
    floors = {"min_probe_bit_acc": 0.935, "min_probe_psnr": 29.9}
    predictor, record = fit_read_predictor(reader, floors, codes=600, seed=3)
    fresh = np.random.default_rng(99).integers(0, 2, (400, BITS), dtype=np.uint8)
    truth = np.array([reader.truth(code) for code in fresh])
    predicted = predictor(fresh)
    assert np.corrcoef(predicted[:, 0], truth[:, 0])[0, 1] > 0.95
    assert np.corrcoef(predicted[:, 1], truth[:, 1])[0, 1] > 0.95
    assert record["cv_r2_bit_acc"] > 0.8
    assert record["pass_rate"] == pytest.approx(record["probe_pass_rate_on_fit_codes"], abs=0.06)
    assert record["pass_rate_codes"] == 100_000 and record["min_predicted_psnr"] == 29.9
    with Registry(":memory:", BITS, min_distance=0) as registry:
        screen = PredictedScreen(predictor, record, registry)
        kept = np.array([screen(np.random.default_rng([5, i])) for i in range(60)])
    kept_truth = np.array([reader.truth(code) for code in kept])
    assert kept_truth[:, 0].mean() > truth[:, 0].mean() + 0.003  # a screen that keeps better codes
    assert screen.predicted_bit_acc >= record["min_predicted_bit_acc"] and screen.draws >= 1


def test_a_predictor_round_trips_through_the_checkpoint(tmp_path):
    model = load_fingerprint_model(shipped_checkpoint("embedded_pnm"))
    predictor = ReadPredictor(np.arange(2 * 1176, dtype=np.float64).reshape(1176, 2), np.array([0.5, 30.0]))
    model.issue_predictor = predictor.state_dict()
    model.meta["issue_screen"] = {**model.meta["issue_screen"], "predictor": {"min_predicted_bit_acc": 0.9}}
    save_fingerprint_model(model, tmp_path / "ckpt")
    loaded, record = recorded_predictor(load_fingerprint_model(tmp_path / "ckpt"))
    assert np.array_equal(loaded.weight, predictor.weight) and np.array_equal(loaded.offset, predictor.offset)
    assert record == {"min_predicted_bit_acc": 0.9}
    state = predictor.state_dict()
    model.issue_predictor = {"weight": state["weight"][:-1], "offset": state["offset"]}
    with pytest.raises(CheckpointError, match="does not fit its 48-bit codes"):
        recorded_predictor(model)  # a predictor for other codes: refused, not a matmul traceback at the first draw
    del model.meta["issue_screen"]["predictor"]
    with pytest.raises(ConfigError, match="--predictor"):
        recorded_predictor(model)


def test_a_fit_no_code_passes_is_refused_not_recorded():
    with pytest.raises(ConfigError, match="clears the floors"):
        fit_read_predictor(QuadraticReader(), {"min_probe_bit_acc": 0.999, "min_probe_psnr": 29.9}, codes=50)


def test_the_bound_divides_by_the_smallest_rate_any_screen_of_the_checkpoint_passes():
    """The registry does not record which screen kept a code: the bound takes the least rate."""
    recorded = {"pass_rate": 0.32, "predictor": {"pass_rate": 0.1}}
    assert bound_pass_rate(0.5, recorded) == 0.1
    assert bound_pass_rate(0.05, recorded) == 0.05
    assert bound_pass_rate(0.5, {"pass_rate": 0.32}) == 0.32
    assert bound_pass_rate(None, recorded) is None


def test_task_issue_screens_by_the_recorded_predictor_when_told(tmp_path):
    """The shipped pnm checkpoint records a predictor; task=issue uses it with screen_by=predicted."""
    model = load_fingerprint_model(shipped_checkpoint("embedded_pnm"))
    record = model.meta["issue_screen"]["predictor"]
    env = {**os.environ, "FINGERPRINT_LM_SECRET": "test-secret"}
    done = run_console(["task=issue", "user_id=alice", "distributor.screen_by=predicted"], cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    (issued,) = tmp_path.glob("outputs/runs/*/issue.json")
    result = json.loads(issued.read_text())
    assert result["screen"] == {k: record[k] for k in ("min_predicted_bit_acc", "min_predicted_psnr")}
    assert result["predicted_bit_acc"] >= record["min_predicted_bit_acc"] and "predicted probe" in done.stdout
    with Registry(tmp_path / "registry" / "registry.sqlite", model.fingerprint_bits) as registry:
        code = np.asarray(registry.get("alice")["code"], dtype=np.uint8)
        assert registry.screen_pass_rate() == pytest.approx(1 / result["code_draws"])
    predictor, _ = recorded_predictor(model)
    assert predictor(code[None])[0, 0] == pytest.approx(result["predicted_bit_acc"])
    refused = run_console(["task=issue", "user_id=bob", "distributor.screen_by=decoded"], cwd=tmp_path, env=env)
    assert refused.returncode != 0 and "error: distributor.screen_by" in refused.stderr
    mixed = run_console(["task=issue", "user_id=bob", "distributor.screen_by=predicted",
                         "distributor.min_probe_psnr=30"], cwd=tmp_path, env=env)
    assert mixed.returncode == 2 and "keeps the predictor's thresholds" in mixed.stderr
    with Registry(tmp_path / "registry" / "registry.sqlite", model.fingerprint_bits) as registry:
        assert registry.list_users() == ["alice"]  # neither refusal registered bob


def test_task_issue_refuses_a_predicted_screen_the_checkpoint_cannot_give_and_writes_nothing(tmp_path):
    """method=carrier's checkpoint records no predictor: one error line naming the fit, no registry."""
    env = {**os.environ, "FINGERPRINT_LM_SECRET": "test-secret"}
    done = run_console(["task=issue", "user_id=bob", "method=carrier", "distributor.screen_by=predicted"],
                       cwd=tmp_path, env=env)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2 and len(errors) == 1 and "--predictor" in errors[0], done.stderr
    assert not (tmp_path / "registry").exists() and not (tmp_path / "copies").exists()


def _issued(tmp_path, user_id: str) -> dict:
    for path in tmp_path.glob("outputs/runs/*/issue.json"):
        result = json.loads(path.read_text())
        if result["user_id"] == user_id:
            return result
    raise AssertionError(f"no issue.json for {user_id}")


def test_task_issue_screens_by_the_recorded_predictor_by_default_and_on_the_probe_when_told(tmp_path):
    """screen_by=auto (the default): the predictor of a checkpoint that records one; the probe when
    asked for or when a probe floor is set; no screen on a checkpoint that records neither."""
    env = {**os.environ, "FINGERPRINT_LM_SECRET": "test-secret"}
    floors = load_fingerprint_model(shipped_checkpoint("embedded_pnm")).meta["issue_screen"]
    issued = {}
    for user_id, overrides, screen_by in (("alice", [], "predicted"), ("bob", ["distributor.screen_by=probe"], "probe"),
                                          ("carol", ["distributor.min_probe_psnr=29.95"], "probe")):
        done = run_console(["task=issue", f"user_id={user_id}", *overrides], cwd=tmp_path, env=env)
        assert done.returncode == 0, done.stderr
        issued[user_id] = _issued(tmp_path, user_id)  # read at once: runs in the same second share a folder
        assert issued[user_id]["screen_by"] == screen_by
    assert issued["alice"]["predicted_bit_acc"] >= floors["predictor"]["min_predicted_bit_acc"]
    assert issued["bob"]["probe_bit_acc"] >= floors["min_probe_bit_acc"]
    assert issued["carol"]["screen"] == {"min_probe_bit_acc": floors["min_probe_bit_acc"], "min_probe_psnr": 29.95}
    carrier = tmp_path / "carrier"
    carrier.mkdir()
    done = run_console(["task=issue", "user_id=dave", "method=carrier"], cwd=carrier, env=env)
    assert done.returncode == 0, done.stderr
    assert "screen_by" not in _issued(carrier, "dave") and "code_draws" not in _issued(carrier, "dave")


def test_training_fits_the_read_predictor_after_the_floors(tmp_path):
    """What the training task does after fitting a checkpoint's floors (eval.issue_predictor_codes):
    the predictor's weights on the model and its record under the floors, which task=issue then screens with."""
    model = load_fingerprint_model(shipped_checkpoint("embedded_pnm"))
    floors = {k: v for k, v in model.meta["issue_screen"].items() if k != "predictor"}
    model.issue_predictor, model.meta = {}, {**model.meta, "issue_screen": floors}
    assert choose_screen(model) == "probe"  # no predictor recorded: auto falls back to the probe
    fitted = with_read_predictor(model, floors, 20)  # 20 codes' probe reads (its folds take 10 at least)
    assert {k: fitted[k] for k in floors} == floors and fitted["predictor"]["fit_codes"] == 20
    model.meta["issue_screen"] = fitted
    predictor, record = recorded_predictor(model)
    assert record == fitted["predictor"] and predictor.weight.shape == (48 + 48 * 47 // 2, 2)
    assert choose_screen(model) == "predicted"
    assert check_predictor_codes("n", 0) == 0 and check_predictor_codes("n", 10) == 10
    for bad in (-1, 3):
        with pytest.raises(ConfigError, match="predictor codes"):
            check_predictor_codes("predictor codes", bad)
    with pytest.raises(ConfigError, match="fit them first"):
        with_read_predictor(model, {"min_probe_psnr": 29.9}, 40)


def test_training_refuses_a_bad_predictor_fit_size_before_it_trains(tmp_path):
    done = run_console(["eval.issue_predictor_codes=3", "logger=none"], cwd=tmp_path)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode == 2 and len(errors) == 1 and "eval.issue_predictor_codes" in errors[0], done.stderr
    assert not list(tmp_path.rglob("*.ckpt")) and not list(tmp_path.rglob("fingerprint.json"))


def test_a_training_run_whose_predictor_fit_fails_keeps_its_floors_and_saves(caplog):
    """A fit that finds nothing to predict (no code clears the floors) is a warning at the end of
    training, not the loss of the trained model: the floors alone are recorded."""
    model = load_fingerprint_model(shipped_checkpoint("embedded_pnm"))
    floors = {**{k: v for k, v in model.meta["issue_screen"].items() if k != "predictor"}, "min_probe_bit_acc": 1.0}
    model.issue_predictor, metrics = {}, {}
    assert _with_predictor(model, floors, 10, metrics, "cpu") == floors
    assert "clears the floors" in metrics["issue_predictor_error"] and model.issue_predictor == {}
    assert "no read predictor recorded" in caplog.text
