"""task=text2image_eval on a tiny Stable Diffusion pipeline built here (no downloads).

The fingerprint model is the shipped embedded checkpoint (48 bits, 32 px, VAE with 4 latent
channels and downscale factor 4): a fingerprint reliable enough to attribute every image, with no
training in the test. The pipeline is a randomly initialised tiny UNet and CLIP text model with the
checkpoint's base VAE, so the copies decode its latents. Its images are noise-like, but the
decoder's carriers do not depend on content: the copy's images read 48/48 bits, the base VAE's
images about half (measured while writing these tests), which is what the assertions rely on.
"""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from omegaconf import OmegaConf
from PIL import Image

from fingerprint_lm.data.coco import CocoCaptions, write_tiny_coco
from fingerprint_lm.distributor.copies import issue_copy, load_copy
from fingerprint_lm.errors import CheckpointError, ConfigError, RegistryError
from fingerprint_lm.evaluation import text2image
from fingerprint_lm.evaluation.sd_pipeline import check_copy_fits, generate_latents, load_text2image_pipeline
from fingerprint_lm.evaluation.text2image import GRID_NAME, METRICS_NAME, choose_fid_mode, resolve_dtype
from fingerprint_lm.models.checkpoint import load_fingerprint_model
from fingerprint_lm.registry.store import Registry
from fingerprint_lm.tasks import run, text2image_eval
from tests.conftest import ROOT, compose_config
from tests.console import run_console
from tests.tiny_sd import build_tiny_pipeline

SECRET = "text2image-test-secret"
USERS = ("alice", "bob", "carol")
CODE_BITS = 48
N_IMAGES = 6


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """A tiny pipeline, a registry with three users (copies with ACT `all`, issued as task=issue
    does, where the composed config looks for them), a tiny COCO folder, and that config."""
    root = tmp_path_factory.mktemp("text2image")
    model = load_fingerprint_model()
    (root / "registry").mkdir()
    with Registry(root / "registry" / "registry.sqlite", CODE_BITS, min_distance=8) as registry:
        for seed, user in enumerate(USERS):
            issue_copy(
                model,
                registry,
                user,
                root / "copies",
                secret=SECRET.encode(),
                act_type="all",
                rng=np.random.default_rng(seed),
            )
    pipeline = build_tiny_pipeline(root / "tiny_sd")
    coco = write_tiny_coco(root / "coco", n_images=N_IMAGES, resolution=40)
    cfg = compose_config(
        root,
        [
            "task=text2image_eval",
            "method=carrier",  # the checkpoint loaded above (load_fingerprint_model(): assets/embedded)
            f"text2image.pipeline_path={pipeline}",
            "user_id=bob",
            f"text2image.coco_root={coco}",
            f"text2image.n_images={N_IMAGES}",
            "text2image.num_inference_steps=3",
            "text2image.guidance_scale=2.0",
            "text2image.batch_size=4",  # 6 images: a full batch and a partial one
            "text2image.grid_images=4",
            "text2image.progress=false",
        ],
    )
    return {"root": root, "pipeline": pipeline, "coco": coco, "cfg": cfg}


def evaluate(world: dict, out: str, *overrides: str) -> dict:
    """Run the task with ``key=value`` overrides applied to the module's composed config (composing
    anew costs about a second a call here)."""
    cfg = copy.deepcopy(world["cfg"])
    for override in (f"text2image.output_dir={world['root'] / out}", *overrides):
        key, _, value = override.partition("=")
        OmegaConf.update(cfg, key, yaml.safe_load(value), force_add=False)
    return run(cfg)


def read_pixels(paths) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])


# -- tests ------------------------------------------------------------------------------------------
def test_config_defaults(tmp_path):
    settings = compose_config(tmp_path, ["task=text2image_eval", "user_id=dora", "copy=/copies/dora"]).text2image
    assert settings.pipeline_path is None and settings.fid == "auto" and settings.fid_min_images == 50
    assert settings.user_id == "dora" and settings.copy_path == "/copies/dora"  # from the task's arguments (conf/task/)
    assert settings.output_dir == f"{tmp_path}/run/text2image"
    assert settings.device == "auto" and settings.dtype == "auto" and settings.seed == 0


@pytest.fixture(scope="module")
def proxy_run(world) -> tuple[dict, Path]:
    """bob's copy evaluated with fid_proxy: the metrics and the output folder."""
    # the real fid_proxy net and training, on 256 procedural images instead of 4096 (drawing those
    # alone takes seconds here); the task imports it at module level, so it is patched there
    train = text2image_eval.train_proxy_feature_net
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(text2image_eval, "train_proxy_feature_net",
                      lambda *args, **kwargs: train(*args, **kwargs, train_size=256))
        metrics = evaluate(world, "eval_bob", "text2image.fid=proxy", "text2image.fid_min_images=2",
                           "text2image.fid_proxy_steps=20")
    return metrics, world["root"] / "eval_bob"


def test_evaluation_writes_its_metrics(proxy_run):
    metrics, out = proxy_run
    saved = json.loads((out / METRICS_NAME).read_text())
    assert saved["bit_acc"] == metrics["bit_acc"] and saved["user_id"] == "bob"
    assert saved.keys() >= {
        "n_images", "bit_acc", "bit_acc_min", "attributed_rate", "misattributed", "match_threshold",
        "bit_acc_base", "base_accused_rate", "psnr_vs_base", "fid_mode", "fid_proxy", "fid_proxy_base",
        "fid", "resolution", "seed", "device", "dtype", "images", "grid",
    }
    assert metrics["n_images"] == N_IMAGES and len(metrics["images"]) == N_IMAGES
    assert metrics["resolution"] == 32 and metrics["device"] == "cpu" and metrics["dtype"] == "float32"
    assert metrics["code_length"] == CODE_BITS and metrics["n_users"] == len(USERS)


def test_every_image_is_attributed_to_the_user_and_none_of_the_controls(world, proxy_run):
    metrics, _ = proxy_run
    with Registry(world["root"] / "registry" / "registry.sqlite", CODE_BITS) as registry:
        code = "".join(str(int(b)) for b in registry.get("bob")["code"])
    for row in metrics["images"]:
        assert len(row["bits"]) == CODE_BITS and set(row["bits"]) <= {"0", "1"}
        assert row["bit_acc"] == sum(a == b for a, b in zip(row["bits"], code)) / CODE_BITS
        assert row["accused_user"] == "bob" and row["p_value"] <= 1e-6
        assert row["base_accused_user"] is None  # the same latents through the pipeline's own VAE
        assert row["seed"] == row["index"] and Path(row["file"]).is_file() and Path(row["base_file"]).is_file()
    assert metrics["bit_acc"] >= 0.95 and metrics["attributed_rate"] == 1.0 and metrics["misattributed"] == 0
    assert metrics["bit_acc_base"] < 0.8 and metrics["base_accused_rate"] == 0.0
    assert 10.0 < metrics["psnr_vs_base"] < 60.0  # marked, not identical


def test_the_proxy_is_named_a_proxy_and_the_grid_is_written(proxy_run):
    metrics, out = proxy_run
    assert metrics["fid_mode"] == "proxy" and metrics["fid"] is None and metrics["fid_base"] is None
    assert "not comparable" in metrics["fid_note"]
    # two distances of two different image sets (marked copy, base VAE) to the same real images
    assert math.isfinite(metrics["fid_proxy"]) and math.isfinite(metrics["fid_proxy_base"])
    assert metrics["fid_proxy"] != metrics["fid_proxy_base"]
    grid = Image.open(out / GRID_NAME)
    assert grid.size == (4 * 32 + 3 * 2, 2 * 32 + 2) and Path(metrics["grid"]) == out / GRID_NAME
    assert sorted(p.name for p in (out / "images" / "copy").iterdir()) == [f"{i:05d}.png" for i in range(N_IMAGES)]


def test_the_copy_is_the_pipelines_vae(world, proxy_run):
    """The pipeline's own decode (float32) gives the evaluation's pixels. It is called on the
    evaluation's first batch (text2image.batch_size=4, one generator per image): a batch of 1 runs
    the UNet with other float32 rounding, one 8-bit level off here and there."""
    metrics, _ = proxy_run
    pipe = load_text2image_pipeline(world["pipeline"], load_copy(world["root"] / "copies" / "bob"), torch.device("cpu"))
    batch = metrics["images"][:4]
    images = pipe(
        prompt=[row["caption"] for row in batch], height=32, width=32, num_inference_steps=3, guidance_scale=2.0,
        generator=[torch.Generator().manual_seed(row["seed"]) for row in batch],
    ).images
    for row, image in zip(batch, images):
        assert np.array_equal(np.asarray(image), read_pixels([row["file"]])[0]), row["file"]


def test_same_seed_same_images_and_every_copy_gets_the_same_latents(world):
    first = evaluate(world, "seed0_a")
    # the control decoder and the grid do not touch the copy's images
    again = evaluate(world, "seed0_b", "text2image.baseline=false", "text2image.grid_images=0")
    files = lambda m, key="file": [row[key] for row in m["images"]]  # noqa: E731
    assert np.array_equal(read_pixels(files(first)), read_pixels(files(again)))
    assert [r["bits"] for r in first["images"]] == [r["bits"] for r in again["images"]]
    assert "bit_acc_base" not in again and "base_file" not in again["images"][0] and again["grid"] is None

    # another user's copy decodes the same latents: identical control images, other marks
    alice = evaluate(world, "seed0_alice", "user_id=alice")
    assert np.array_equal(read_pixels(files(first, "base_file")), read_pixels(files(alice, "base_file")))
    assert not np.array_equal(read_pixels(files(first)), read_pixels(files(alice)))
    assert all(row["accused_user"] == "alice" for row in alice["images"])

    # default fid=auto with 6 images: skipped, and the metrics say why
    assert first["fid_mode"] == "off" and first["fid"] is None and first["fid_proxy"] is None
    assert "fid_min_images=50" in first["fid_skipped_reason"]


def test_clean_fid_compares_the_generated_and_the_coco_folders(world, monkeypatch):
    """The wiring of the clean-fid path (clean-fid itself is not installed here: a recording
    stand-in replaces it and returns 1.0, then 2.0)."""
    calls = []

    def recording_clean_fid(dir_a, dir_b, device=None, **_):
        a, b = sorted(Path(dir_a).iterdir()), sorted(Path(dir_b).iterdir())
        calls.append((Path(dir_a).name, Path(dir_b).name, len(a), len(b), Image.open(b[0]).size))
        return float(len(calls))

    # the task and the evaluation import these names at module level: patch them where they are used
    monkeypatch.setattr(text2image_eval, "clean_fid_available", lambda *args, **kwargs: True)
    monkeypatch.setattr(text2image, "clean_fid", recording_clean_fid)
    metrics = evaluate(world, "clean", "text2image.fid_min_images=2")
    reference = (32, 32)
    assert calls == [("copy", "reference", 6, 6, reference), ("base", "reference", 6, 6, reference)]
    assert metrics["fid_mode"] == "clean" and metrics["fid"] == 1.0 and metrics["fid_base"] == 2.0
    assert (
        metrics["fid_proxy"] is None and metrics["fid_note"] is None and metrics["fid_skipped_reason"] is None
    )
    # the reference folder holds the captions' own COCO images, resized and centre-cropped
    coco = CocoCaptions(world["coco"], "val2017", resolution=32)
    expected = ((coco[0]["image"] + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.array_equal(
        read_pixels([world["root"] / "clean" / "images" / "reference" / "00000.png"])[0], expected
    )


def test_latents_follow_the_seed_not_the_batch(world):
    pipe = load_text2image_pipeline(
        world["pipeline"], load_copy(world["root"] / "copies" / "bob"), torch.device("cpu")
    )
    prompts = ["a red circle", "a blue striped square on green"]
    both = generate_latents(pipe, prompts, [5, 6], 32, 3, 2.0)
    alone = generate_latents(pipe, prompts[1:], [6], 32, 3, 2.0)
    assert both.shape == (2, 4, 8, 8)
    # batched kernels round differently (a PNG pixel may move by one level), nothing more
    torch.testing.assert_close(both[1:], alone, atol=1e-5, rtol=1e-5)
    other_seed = generate_latents(pipe, prompts[1:], [7], 32, 3, 2.0)
    assert (other_seed - alone).abs().max() > 0.1


def test_fid_mode_choice():
    assert choose_fid_mode("auto", 100, 50, clean_available=True) == ("clean", None)
    mode, reason = choose_fid_mode("auto", 100, 50, clean_available=False)
    assert mode == "proxy" and "clean-fid not available" in reason
    mode, reason = choose_fid_mode("proxy", 10, 50, clean_available=True)
    assert mode == "off" and "10 images" in reason
    assert choose_fid_mode("off", 100, 50, clean_available=True)[0] == "off"
    with pytest.raises(ConfigError, match="fid=clean but clean-fid is not available"):
        choose_fid_mode("clean", 100, 50, clean_available=False)
    with pytest.raises(ConfigError, match="text2image.fid must be one of"):
        choose_fid_mode("inception", 100, 50, clean_available=True)
    with pytest.raises(ConfigError, match="fid_min_images"):
        choose_fid_mode("auto", 100, 1, clean_available=True)
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        resolve_dtype("float16", torch.device("cpu"))
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32


def test_a_copy_for_another_model_is_refused():
    pipe = SimpleNamespace(unet=SimpleNamespace(config=SimpleNamespace(in_channels=4)))

    def vae(channels: int, scaling: float, levels: int) -> SimpleNamespace:
        config = SimpleNamespace(
            latent_channels=channels, scaling_factor=scaling, block_out_channels=[8] * levels
        )
        return SimpleNamespace(config=config)

    check_copy_fits(pipe, vae(4, 1.0, 3), vae(4, 1.0, 3))
    check_copy_fits(pipe, vae(4, 1.0, 3), None)
    with pytest.raises(ConfigError, match="decodes 16-channel latents but the pipeline's UNet makes 4"):
        check_copy_fits(pipe, vae(16, 1.0, 3))
    with pytest.raises(ConfigError, match="scaling_factor=0.18215 but the pipeline's VAE 1.0"):
        check_copy_fits(pipe, vae(4, 0.18215, 3), vae(4, 1.0, 3))
    with pytest.raises(ConfigError, match="different factors"):
        check_copy_fits(pipe, vae(4, 1.0, 4), vae(4, 1.0, 3))


def test_bad_input(world, tmp_path):
    missing = tmp_path / "no_such_pipeline"
    with pytest.raises(CheckpointError, match="no Stable Diffusion pipeline at") as error:
        evaluate(world, "bad", f"text2image.pipeline_path={missing}")
    assert "\n" not in str(error.value)
    with pytest.raises(ConfigError, match="needs text2image.pipeline_path"):
        evaluate(world, "bad", "text2image.pipeline_path=null")
    with pytest.raises(RegistryError, match="unknown user 'mallory'"):
        evaluate(world, "bad", "user_id=mallory")
    with pytest.raises(ConfigError, match="needs user_id"):
        evaluate(world, "bad", "user_id=null")
    # alice's copy presented as bob's: the registered hash does not match
    with pytest.raises(CheckpointError, match="does not match the expected hash"):
        evaluate(world, "bad", f"copy={world['root'] / 'copies' / 'alice'}")
    with pytest.raises(ConfigError, match="multiple of 8"):
        evaluate(world, "bad", "text2image.resolution=36")
    broken = tmp_path / "broken_pipeline"
    broken.mkdir()
    (broken / "model_index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot load the Stable Diffusion pipeline") as error:
        evaluate(world, "bad", f"text2image.pipeline_path={broken}")
    assert "\n" not in str(error.value)
    assert not (world["root"] / "bad").exists()


def test_cli_missing_pipeline_is_one_line_and_exit_2(tmp_path):
    """Through the console (in this interpreter: tests/console.py)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = run_console(["logger=none", "task=text2image_eval", "user_id=alice", f"paths.root_dir={tmp_path}",
                          f"text2image.pipeline_path={tmp_path / 'nowhere'}"], cwd=ROOT, env=env)
    assert result.returncode == 2, result.stderr
    assert (
        result.stderr.strip()
        == f"error: no Stable Diffusion pipeline at {tmp_path / 'nowhere'} (no such folder)"
    )
