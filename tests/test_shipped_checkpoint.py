"""The embedded checkpoint shipped in the package, evaluated on freshly generated images."""

import json

import numpy as np
import pytest
import torch

from fingerprint_lm.data.synthetic import ProceduralImages
from fingerprint_lm.errors import CheckpointError
from fingerprint_lm.lit.stages import evaluate_fingerprint
from fingerprint_lm.models.checkpoint import SHIPPED_CHECKPOINT, load_fingerprint_model, shipped_checkpoint


@pytest.fixture(scope="module")
def shipped():
    torch.manual_seed(0)
    return load_fingerprint_model()


def test_shipped_checkpoint_is_safetensors_only():
    files = {p.name for p in SHIPPED_CHECKPOINT.rglob("*") if p.is_file()}
    assert "fingerprint.safetensors" in files and "diffusion_pytorch_model.safetensors" in files
    assert not [f for f in files if f.endswith((".ckpt", ".pt", ".pth", ".bin", ".pkl"))]


def test_shipped_checkpoint_reads_fresh_fingerprints_on_fresh_images(shipped):
    # a seed never used in training or in the run's own evaluation
    images = [s["image"] for s in ProceduralImages(resolution=32, seed=987_654, length=256)]
    loader = [{"image": torch.stack(images[i : i + 64])} for i in range(0, 256, 64)]
    metrics = evaluate_fingerprint(shipped, loader, probes={}, seed=2024)
    assert shipped.fingerprint_bits == 48
    assert metrics["bit_acc"] >= 0.99, metrics
    assert metrics["psnr"] >= 30.0, metrics
    recorded = json.loads((SHIPPED_CHECKPOINT / "fingerprint.json").read_text())["metrics"]
    assert abs(recorded["bit_acc"] - metrics["bit_acc"]) < 0.01


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    import shutil

    copy = tmp_path / "ckpt"
    shutil.copytree(SHIPPED_CHECKPOINT, copy)
    weights = copy / "fingerprint.safetensors"
    weights.write_bytes(weights.read_bytes()[:2000])
    with pytest.raises(CheckpointError):
        load_fingerprint_model(copy)
    with pytest.raises(CheckpointError, match="fingerprint.json"):
        load_fingerprint_model(tmp_path / "nowhere")


# -- method=pnm: its shipped checkpoint, read through a stock diffusers load -----------------------
PNM_CHECKPOINT = shipped_checkpoint("embedded_pnm")


def test_shipped_pnm_checkpoint_is_safetensors_only_and_records_its_method():
    files = {p.name for p in PNM_CHECKPOINT.rglob("*") if p.is_file()}
    assert files == {"fingerprint.json", "fingerprint.safetensors", "config.json", "diffusion_pytorch_model.safetensors"}
    assert json.loads((PNM_CHECKPOINT / "fingerprint.json").read_text())["method"] == "pnm"


def test_shipped_pnm_checkpoint_re_evaluated_through_stock_loaded_copies(tmp_path):
    """Issue a copy (ACT all), load it with AutoencoderKL.from_pretrained, decode fresh images, save
    them as 8-bit pixels, read them: the recorded bit accuracy (0.598 on 512 images with fresh
    random codes) is reproduced within 0.02 for this one user, and is above 0.53; PSNR vs the base
    decoder >= 29.5 dB.
    (The issue's target, 0.99, is not met: README, "Results".)"""
    from diffusers import AutoencoderKL

    from fingerprint_lm.distributor.copies import issue_copy
    from fingerprint_lm.distributor.generation import decode_with, held_out_images, to_uint8_pixels
    from fingerprint_lm.metrics.quality import psnr
    from fingerprint_lm.registry.store import Registry

    model = load_fingerprint_model(PNM_CHECKPOINT)
    assert model.method == "pnm" and model.pnm.spatial_site_name is None
    with Registry(tmp_path / "registry.sqlite", model.fingerprint_bits) as registry:
        issued = issue_copy(model, registry, "alice", tmp_path / "copies", secret=b"s", act_type="all",
                            rng=np.random.default_rng(0))
        code = torch.as_tensor(registry.get("alice")["code"]).long()
    assert sorted(p.name for p in (tmp_path / "copies" / "alice").iterdir()) == [
        "config.json", "diffusion_pytorch_model.safetensors"]
    stock = AutoencoderKL.from_pretrained(issued["copy"]).eval()
    images = held_out_images(32, 256, seed=31)  # a seed the training run never used
    marked = decode_with(model.vae, stock, images)
    base = decode_with(model.vae, model.vae, images)
    pixels = torch.from_numpy(to_uint8_pixels(marked)).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        bit_acc = ((model.extractor(pixels) > 0).long() == code).float().mean().item()
    recorded = json.loads((PNM_CHECKPOINT / "fingerprint.json").read_text())["metrics"]
    assert bit_acc >= 0.53, bit_acc
    assert abs(bit_acc - recorded["bit_acc"]) < 0.02, (bit_acc, recorded)
    assert psnr(marked, base).mean().item() >= 29.5
