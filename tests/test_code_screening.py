"""Screening codes at issue time (``distributor.min_probe_bit_acc``, distributor/screening.py): the
issued code is one whose decoder reads at least the threshold on the probe images, the user's
stock-loaded copy (ACT all) reads the probe as the screen did, and a threshold no code reaches is
one RegistryError with nothing written or registered."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fingerprint_lm.distributor.copies import issue_copy
from fingerprint_lm.distributor.generation import decode_with
from fingerprint_lm.distributor.screening import CodeScreen
from fingerprint_lm.errors import RegistryError
from fingerprint_lm.models import batched
from fingerprint_lm.models.checkpoint import load_fingerprint_model, shipped_checkpoint
from fingerprint_lm.pixels import from_uint8, to_uint8
from fingerprint_lm.registry.store import Registry


@pytest.fixture(scope="module")
def pnm_model():
    return load_fingerprint_model(shipped_checkpoint("embedded_pnm"))


def test_a_screened_copy_reads_the_probe_at_least_at_the_threshold(tmp_path, pnm_model):
    from diffusers import AutoencoderKL

    with Registry(tmp_path / "registry.sqlite", pnm_model.fingerprint_bits) as registry:
        screen = CodeScreen(pnm_model, registry, 0.93, probe_images=32)
        issued = issue_copy(pnm_model, registry, "alice", tmp_path / "copies", secret=b"s", act_type="all",
                            rng=np.random.default_rng(3), draw_code=screen)
        code = np.asarray(registry.get("alice")["code"], dtype=bool)
    assert screen.probe_bit_acc >= 0.93 and screen.draws >= 1
    stock = AutoencoderKL.from_pretrained(issued["copy"]).eval()
    with torch.no_grad():
        pixels = from_uint8(to_uint8(decode_with(pnm_model.vae, stock, screen.images)))
        logits = batched.extract(pnm_model.extractor, pixels, "cpu").numpy()
    # ACT keeps the decoder's function (within 1e-5), so the copy reads the probe as the screen did
    assert abs(float(((logits > 0) == code).mean()) - screen.probe_bit_acc) <= 0.005


def test_an_unreachable_threshold_is_one_error_and_nothing_is_issued(tmp_path, pnm_model):
    with Registry(tmp_path / "registry.sqlite", pnm_model.fingerprint_bits) as registry:
        screen = CodeScreen(pnm_model, registry, 0.9999, probe_images=8, max_draws=3)
        with pytest.raises(RegistryError, match="no code among 3 draws read >= 0.9999"):
            issue_copy(pnm_model, registry, "bob", tmp_path / "copies", secret=b"s",
                       rng=np.random.default_rng(0), draw_code=screen)
        assert "bob" not in registry
    assert not (tmp_path / "copies" / "bob").exists()


def test_task_issue_screens_codes_when_asked_and_reports_it(tmp_path):
    """The distributor's command with the setting, as docs/distributor.md shows it."""
    import json
    import os

    from tests.console import run_console

    env = {**os.environ, "FINGERPRINT_LM_SECRET": "test-secret"}
    done = run_console(["task=issue", "method=pnm", "user_id=alice", "distributor.min_probe_bit_acc=0.922"],
                       cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    (issued,) = tmp_path.glob("outputs/runs/*/issue.json")
    result = json.loads(issued.read_text())
    assert result["probe_bit_acc"] >= 0.922 and result["code_draws"] >= 1
    assert sorted(p.name for p in (tmp_path / "copies" / "alice").iterdir()) == [
        "config.json", "diffusion_pytorch_model.safetensors"]
