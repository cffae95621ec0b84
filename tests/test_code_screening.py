"""Screening codes at issue time (distributor/screening.py; on by default for pnm): the issued code
is one whose decoder reads at least the bit floor on the probe images and decodes them at least the
PSNR floor from the base decoder's, the user's stock-loaded copy (ACT all) reads the probe as the
screen did, floors no code reaches are one RegistryError with nothing written or registered, and
task=issue takes the checkpoint's recorded floors unless told otherwise."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL

from fingerprint_lm.distributor.copies import issue_copy
from fingerprint_lm.distributor.generation import decode_with
from fingerprint_lm.distributor.screening import CodeScreen, ProbeReader, fit_floors, screen_floors
from fingerprint_lm.errors import RegistryError
from fingerprint_lm.metrics.quality import psnr
from fingerprint_lm.models import batched
from fingerprint_lm.models.checkpoint import load_fingerprint_model, shipped_checkpoint
from fingerprint_lm.pixels import from_uint8, to_uint8
from fingerprint_lm.registry.store import Registry
from fingerprint_lm.tasks.compose import method_config
from tests.console import run_console


@pytest.fixture(scope="module")
def pnm_model():
    return load_fingerprint_model(shipped_checkpoint("embedded_pnm"))


def test_a_screened_copy_reads_the_probe_at_least_at_the_threshold(tmp_path, pnm_model):
    with Registry(tmp_path / "registry.sqlite", pnm_model.fingerprint_bits) as registry:
        screen = CodeScreen(pnm_model, registry, 0.93, probe_images=32)
        issued = issue_copy(pnm_model, registry, "alice", tmp_path / "copies", secret=b"s", act_type="all",
                            rng=np.random.default_rng(3), draw_code=screen)
        code = np.asarray(registry.get("alice")["code"], dtype=bool)
    assert screen.probe_bit_acc >= 0.93 and screen.draws >= 1
    stock = AutoencoderKL.from_pretrained(issued["copy"]).eval()
    with torch.no_grad():
        pixels = from_uint8(to_uint8(decode_with(pnm_model.vae, stock, screen.images)))
        logits = batched.extract(pnm_model.reader, pixels, "cpu").numpy()
    # ACT keeps the decoder's function (within 1e-5), so the copy reads the probe as the screen did
    assert abs(float(((logits > 0) == code).mean()) - screen.probe_bit_acc) <= 0.005


def test_an_unreachable_threshold_is_one_error_and_nothing_is_issued(tmp_path, pnm_model):
    with Registry(tmp_path / "registry.sqlite", pnm_model.fingerprint_bits) as registry:
        screen = CodeScreen(pnm_model, registry, 0.9999, probe_images=8, max_draws=3)
        with pytest.raises(RegistryError, match="no code among 3 draws read >= 0.9999"):
            issue_copy(pnm_model, registry, "bob", tmp_path / "copies", secret=b"s",
                       rng=np.random.default_rng(0), draw_code=screen)
        psnr_screen = CodeScreen(pnm_model, registry, None, probe_images=8, max_draws=2, min_psnr=60.0)
        with pytest.raises(RegistryError, match=r"no code among 2 draws decoded >= 60.0 dB \(best 3"):
            issue_copy(pnm_model, registry, "bob", tmp_path / "copies", secret=b"s",
                       rng=np.random.default_rng(0), draw_code=psnr_screen)
        assert "bob" not in registry
    assert not (tmp_path / "copies" / "bob").exists()


def test_the_psnr_floor_holds_for_the_stock_loaded_copy(tmp_path, pnm_model):
    with Registry(tmp_path / "registry.sqlite", pnm_model.fingerprint_bits) as registry:
        screen = CodeScreen(pnm_model, registry, None, probe_images=16, min_psnr=30.2)
        issued = issue_copy(pnm_model, registry, "alice", tmp_path / "copies", secret=b"s", act_type="all",
                            rng=np.random.default_rng(4), draw_code=screen)
    stock = AutoencoderKL.from_pretrained(issued["copy"]).eval()
    with torch.no_grad():
        quality = float(psnr(decode_with(pnm_model.vae, stock, screen.images), screen.read.base).mean())
    assert screen.probe_psnr >= 30.2 and abs(quality - screen.probe_psnr) < 1e-3


def test_fitted_floors_keep_the_asked_share_of_random_codes(pnm_model):
    floors = fit_floors(pnm_model, keep=0.5, min_psnr=1.0, candidates=8, probe_images=8, rate_candidates=16)
    assert floors["candidates"] == 8 and floors["min_probe_psnr"] == 1.0
    fitted = np.random.default_rng(floors["seed"])  # the floor: the median of the 8 fitted codes' reads
    reader = ProbeReader(pnm_model, 8)
    reads = [reader(fitted.integers(0, 2, pnm_model.fingerprint_bits, dtype=np.uint8))[0] for _ in range(8)]
    assert floors["min_probe_bit_acc"] == round(float(np.median(reads)), 6)
    other = np.random.default_rng(floors["pass_rate_seed"])  # the rate: 16 other codes (every copy is above 1 dB)
    reads = [reader(other.integers(0, 2, pnm_model.fingerprint_bits, dtype=np.uint8))[0] for _ in range(16)]
    assert floors["pass_rate_seed"] != floors["seed"] and floors["pass_rate_codes"] == 16
    assert floors["pass_rate"] == np.mean(np.array(reads) >= floors["min_probe_bit_acc"])
    recorded = pnm_model.meta["issue_screen"]  # the shipped checkpoint's, fitted with pnm.yaml's settings
    settings = method_config("pnm").issue_screen
    assert (recorded["keep"], recorded["candidates"], recorded["pass_rate_codes"], recorded["min_probe_psnr"]) == (
        settings.keep, settings.candidates, settings.rate_candidates, settings.min_psnr)
    # the best 10% of reads by the content reader's colour covariance reads (the better half: 0.981)
    assert 0.985 < recorded["min_probe_bit_acc"] < 0.995 and recorded["pass_rate"] < 0.15
    assert screen_floors(recorded, True, None, None) == (recorded["min_probe_bit_acc"], 29.9)
    assert screen_floors(recorded, True, 0.5, None) == (0.5, 29.9)
    assert screen_floors(recorded, False, 0.5, 31.0) == (None, None)
    assert screen_floors(None, True, None, None) == (None, None)


def test_the_probe_reads_run_on_the_device_asked_for(pnm_model, monkeypatch):
    """Training fits the floors and the read predictor on the GPU where there is one (3000 codes'
    probe reads are days of a CPU at SD's size): every decode and read of the probe goes to the
    device given. Here `cpu:0` stands in for a GPU, as a device distinct from the default `cpu`."""
    seen, in_batches = [], batched.in_batches
    monkeypatch.setattr(batched, "in_batches", lambda m, fn, x, device="cpu", batch_size=64:
                        seen.append(device) or in_batches(m, fn, x, device, batch_size))
    device = torch.device("cpu", 0)
    floors = fit_floors(pnm_model, keep=0.5, min_psnr=1.0, candidates=2, probe_images=4, rate_candidates=2,
                        device=device)
    assert len(seen) == 2 + 2 * (2 + 2) and set(seen) == {device}  # the probe's encode and base decode, then
    assert floors["candidates"] == 2                                 # a decode and a read per code


def test_task_issue_screens_codes_with_the_checkpoints_read_predictor_and_reports_it(tmp_path, pnm_model):
    """The distributor's command as the README shows it (pnm, the default), then with screening off."""
    env = {**os.environ, "FINGERPRINT_LM_SECRET": "test-secret"}
    done = run_console(["task=issue", "user_id=alice"], cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    (issued,) = tmp_path.glob("outputs/runs/*/issue.json")
    result = json.loads(issued.read_text())
    predictor = pnm_model.meta["issue_screen"]["predictor"]  # screen_by=auto: the checkpoint's read predictor
    assert result["screen_by"] == "predicted"
    assert result["screen"] == {k: predictor[k] for k in ("min_predicted_bit_acc", "min_predicted_psnr")}
    assert (result["predicted_bit_acc"] >= predictor["min_predicted_bit_acc"]
            and result["predicted_psnr"] >= predictor["min_predicted_psnr"])
    assert result["code_draws"] >= 1 and "code screened" in done.stdout
    assert sorted(p.name for p in (tmp_path / "copies" / "alice").iterdir()) == [
        "config.json", "diffusion_pytorch_model.safetensors"]
    with Registry(tmp_path / "registry" / "registry.sqlite", pnm_model.fingerprint_bits) as registry:
        assert registry.screen_pass_rate() == pytest.approx(1 / result["code_draws"])  # for attribution's bound
    unscreened = run_console(["task=issue", "user_id=bob", "distributor.screen_codes=false"], cwd=tmp_path, env=env)
    assert unscreened.returncode == 0, unscreened.stderr
    with Registry(tmp_path / "registry" / "registry.sqlite", pnm_model.fingerprint_bits) as registry:
        assert registry.screen_pass_rate() == pytest.approx(1 / result["code_draws"])  # bob's draw is not counted
    bob = [json.loads(p.read_text()) for p in tmp_path.glob("outputs/runs/*/issue.json")]
    assert [r for r in bob if r["user_id"] == "bob"][0].keys().isdisjoint({"code_draws", "screen"})
