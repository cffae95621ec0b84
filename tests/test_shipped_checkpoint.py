"""The embedded checkpoint shipped in the package, evaluated on freshly generated images."""

import json

import pytest
import torch

from fingerprint_lm.data.synthetic import ProceduralImages
from fingerprint_lm.errors import CheckpointError
from fingerprint_lm.pipeline.checkpoint import SHIPPED_CHECKPOINT, load_fingerprint_model
from fingerprint_lm.pipeline.stages import evaluate_fingerprint


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
