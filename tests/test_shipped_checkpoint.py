"""The embedded checkpoint shipped in the package, evaluated on freshly generated images."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL

from fingerprint_lm.data.synthetic import ProceduralImages
from fingerprint_lm.distributor.copies import issue_copy
from fingerprint_lm.distributor.generation import decode_with, held_out_images
from fingerprint_lm.errors import CheckpointError
from fingerprint_lm.lit.stages import evaluate_fingerprint
from fingerprint_lm.metrics.quality import psnr
from fingerprint_lm.models.checkpoint import SHIPPED_CHECKPOINT, load_fingerprint_model, shipped_checkpoint
from fingerprint_lm.pixels import from_uint8, to_uint8
from fingerprint_lm.registry.store import Registry


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
    copy = tmp_path / "ckpt"
    shutil.copytree(SHIPPED_CHECKPOINT, copy)
    weights = copy / "fingerprint.safetensors"
    weights.write_bytes(weights.read_bytes()[:2000])
    with pytest.raises(CheckpointError):
        load_fingerprint_model(copy)
    with pytest.raises(CheckpointError, match="fingerprint.json"):
        load_fingerprint_model(tmp_path / "nowhere")


@pytest.mark.parametrize("damage", ["fingerprint.json", "base_vae/diffusion_pytorch_model.safetensors", "removed"])
def test_an_altered_checkpoint_is_refused_by_its_checksums(tmp_path, damage):
    """One flipped byte anywhere (a weight, the record) or a missing file: refused before loading.
    An edited fingerprint.json could otherwise rebuild other modules around the same tensors."""
    copy = tmp_path / "ckpt"
    shutil.copytree(SHIPPED_CHECKPOINT, copy)
    if damage == "removed":
        (copy / "base_vae" / "config.json").unlink()
    else:
        data = bytearray((copy / damage).read_bytes())
        data[len(data) // 2] ^= 0x01
        (copy / damage).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match its SHA256SUMS"):
        load_fingerprint_model(copy)
    # Without the list (a checkpoint written before lists existed) nothing is checked up front: a
    # flipped weight then loads unnoticed (why the list exists); what breaks loading is still one
    # CheckpointError, not a traceback.
    (copy / "SHA256SUMS").unlink()
    if damage.endswith(".safetensors"):
        assert load_fingerprint_model(copy).fingerprint_bits == 48
    else:
        with pytest.raises(CheckpointError):
            load_fingerprint_model(copy)


def test_a_checkpoint_without_checksums_still_loads(tmp_path):
    copy = tmp_path / "ckpt"
    shutil.copytree(SHIPPED_CHECKPOINT, copy)
    (copy / "SHA256SUMS").unlink()
    assert load_fingerprint_model(copy).fingerprint_bits == 48


# -- method=pnm: its shipped checkpoint, read through a stock diffusers load -----------------------
PNM_CHECKPOINT = shipped_checkpoint("embedded_pnm")


def test_shipped_pnm_checkpoint_is_safetensors_only_and_records_its_method():
    files = {str(p.relative_to(PNM_CHECKPOINT)) for p in PNM_CHECKPOINT.rglob("*") if p.is_file()}
    # reference_vae/: the base decoder as it was before training moved the shared one (what PSNR is measured against)
    assert files == {"fingerprint.json", "fingerprint.safetensors", "SHA256SUMS"} | {
        f"{folder}/{name}" for folder in ("base_vae", "reference_vae")
        for name in ("config.json", "diffusion_pytorch_model.safetensors")}
    assert json.loads((PNM_CHECKPOINT / "fingerprint.json").read_text())["method"] == "pnm"


def test_shipped_pnm_checkpoint_re_evaluated_through_stock_loaded_copies(tmp_path):
    """Issue 8 copies (ACT all), load each with AutoencoderKL.from_pretrained, decode fresh images,
    save them as 8-bit pixels, read them. One user's accuracy depends on their code (0.89-0.97
    over 32 users: experiments/per_user_spread.py), so the users' mean, read by the distributor's
    content reader (``model.reader``, fitted after training), is what reproduces the recorded bit
    accuracy (0.9705 on 512 images with a fresh random code per image, read by that reader as
    training evaluates): within 0.03. Every user reads clearly above chance with the band reader the
    decoder trained with (>= 0.6: chance is 0.5 +- 0.005 over 256 x 48 bits), and the content reader
    reads the same images better (+0.02 measured before the decoder also trained against it,
    experiments/results/ratio_reader.md; at least +0.01 here). The users' mean PSNR against the
    decoder as it was (reference_vae/) is >= 29.5 dB (one user's PSNR depends on the code too).
    (The issue's target, 0.99, is not met: README, "Results".)"""
    model = load_fingerprint_model(PNM_CHECKPOINT)
    assert model.method == "pnm" and model.pnm.spatial_site_name is None
    images = held_out_images(32, 256, seed=31)  # a seed the training run never used
    base = decode_with(model.vae, model.reference_vae, images)  # the base as it was, before the shared decoder trained
    accuracies, content_accuracies, psnrs = [], [], []
    with Registry(tmp_path / "registry.sqlite", model.fingerprint_bits) as registry:
        for user in range(8):
            issued = issue_copy(model, registry, f"user{user}", tmp_path / "copies", secret=b"s", act_type="all",
                                rng=np.random.default_rng(user))
            code = torch.as_tensor(registry.get(f"user{user}")["code"]).long()
            assert sorted(p.name for p in Path(issued["copy"]).iterdir()) == [
                "config.json", "diffusion_pytorch_model.safetensors"]
            stock = AutoencoderKL.from_pretrained(issued["copy"]).eval()
            marked = decode_with(model.vae, stock, images)
            pixels = from_uint8(to_uint8(marked))
            with torch.no_grad():
                accuracies.append(((model.extractor(pixels) > 0).long() == code).float().mean().item())
                content_accuracies.append(((model.reader(pixels) > 0).long() == code).float().mean().item())
            psnrs.append(psnr(marked, base).mean().item())
    recorded = json.loads((PNM_CHECKPOINT / "fingerprint.json").read_text())["metrics"]
    assert min(accuracies) >= 0.6, accuracies
    assert abs(np.mean(content_accuracies) - recorded["bit_acc"]) < 0.03, (content_accuracies, recorded)
    assert np.mean(psnrs) >= 29.5, psnrs
    assert model.reader is model.content_reader
    assert np.mean(content_accuracies) >= np.mean(accuracies) + 0.01, (content_accuracies, accuracies)
