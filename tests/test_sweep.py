"""The collusion sweep: one grid point, the summary files, and a shrunken multirun end to end.

One tiny 32-bit model (conftest.tiny_checkpoint, shared with test_distributor). With 32-bit codes and 1000
innocents, attribution at FPR 1e-6 needs >= 30 of 32 matching bits; the tiny model reaches it
un-attacked, so the tests check ordering and consistency rather than exact figures.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fingerprint_lm.devices import resolve_device
from fingerprint_lm.errors import ConfigError
from fingerprint_lm.evaluation.collusion import Point, PointSettings, evaluate_point, parse_case
from fingerprint_lm.metrics.fid import train_proxy_feature_net
from fingerprint_lm.models.checkpoint import SHIPPED_CHECKPOINT, load_fingerprint_model, shipped_checkpoint
from fingerprint_lm.report.tables import COLUMNS, SUMMARY_FILES, write_summary
from fingerprint_lm.tasks import run
from fingerprint_lm.tasks.sweep_point import sweep_model_cache_dir, training_config
from fingerprint_lm.tasks.train import method_from_config
from fingerprint_lm.tasks.training_record import matches_shipped, training_recipe, training_record
from tests.conftest import ROOT, TINY_BITS, compose_config
from tests.console import run_console

BITS = TINY_BITS
N_IMAGES = 24


@pytest.fixture(scope="session")
def sweep_checkpoint(tiny_checkpoint) -> Path:
    return tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_model(sweep_checkpoint):
    return load_fingerprint_model(sweep_checkpoint)


@pytest.fixture(scope="session")
def fid_net(tiny_model):
    return train_proxy_feature_net(int(tiny_model.meta["resolution"]), steps=20, feature_dim=16)


def point(model, fid_net, act="none", attack="none", strength=None, colluders=1, seed=0, n_images=N_IMAGES,
          n_innocents=200, images=None) -> dict:
    settings = PointSettings(n_images=n_images, n_innocents=n_innocents)
    return evaluate_point(model, Point(act, attack, strength, colluders), settings, seed, fid_net, images).as_dict()


def test_parse_case():
    assert parse_case("none_c1") == ("none", None, 1)
    assert parse_case("average_c3") == ("average", None, 3)
    assert parse_case("aligned_average_c2") == ("aligned_average", None, 2)
    assert parse_case("jpeg_q50") == ("jpeg", 50.0, 1)
    assert parse_case("gaussian_blur_s1") == ("gaussian_blur", 1.0, 1)
    assert parse_case("weight_noise_0.05") == ("weight_noise", 0.05, 1)
    assert parse_case("quantize_int8") == ("quantize_int8", None, 1)
    for bad in ("nonsense", "jpeg", "jpeg_q50_c2", "aligned_average_c1", "average_x"):
        with pytest.raises(ConfigError):
            parse_case(bad)


def test_unattacked_copy_is_attributed(tiny_model, fid_net):
    m = point(tiny_model, fid_net)
    assert m["bit_acc"] > 0.95 and m["bit_acc"] == m["bit_acc_min"] == m["bit_acc_max"]
    assert m["attribution_acc"] > 0.8 and m["tpr_at_fpr1e-6"] > 0.8
    assert m["false_positives"] == 0.0
    assert m["tracing_caught"] == 1 and m["tracing_innocents_accused"] == 0
    assert m["psnr"] > 20
    # an un-attacked copy looks like the base decoder to the proxy: within a few points of it
    assert abs(m["fid_proxy"] - m["fid_proxy_base"]) < 0.5 * m["fid_proxy_base"]
    assert m["registry_size"] == 201


def test_average_of_one_copy_is_a_no_op(tiny_model, fid_net):
    plain, averaged = point(tiny_model, fid_net), point(tiny_model, fid_net, attack="average")
    for key in ("bit_acc", "attribution_acc", "psnr", "ssim", "fid_proxy"):
        assert averaged[key] == pytest.approx(plain[key], abs=1e-6), key


def test_collusion_and_act(tiny_model, fid_net):
    alone = point(tiny_model, fid_net)
    naive = point(tiny_model, fid_net, act="all", attack="average", colluders=2)
    naive_no_act = point(tiny_model, fid_net, act="none", attack="average", colluders=2)
    aligned = point(tiny_model, fid_net, act="all", attack="aligned_average", colluders=2)
    assert naive["colluders"] == 2 and naive["bit_acc_min"] <= naive["bit_acc"] <= naive["bit_acc_max"]
    assert naive["bit_acc"] < alone["bit_acc"]  # two codes blended: disagreeing bits are lost
    # ACT breaks naive averaging (the merged decoder drifts from the base) ...
    assert naive["psnr"] < naive_no_act["psnr"] - 3
    # ... and the adaptive colluder undoes ACT: the same model as averaging copies without ACT
    assert aligned["psnr"] == pytest.approx(naive_no_act["psnr"], abs=0.05)
    assert aligned["bit_acc"] == pytest.approx(naive_no_act["bit_acc"], abs=0.01)


def test_image_collusion_names_every_colluder(tiny_model):
    """Colluders pooling their copies' images (each image one colluder's) are each named by
    per-image evidence. Blending two copies' images of the same content halves the evidence: with
    32-bit codes its pooled score (about sqrt(16) = 4) stays under the threshold (5.1 here), so
    only the absence of false accusations is asserted."""
    assert parse_case("image_mix_c3") == ("image_mix", None, 3)
    with pytest.raises(ConfigError, match="at least 2 colluders"):
        parse_case("image_blend_c1")
    mixed = point(tiny_model, None, act="all", attack="image_mix", colluders=3)
    assert mixed["tracing_caught"] == 3 and mixed["tracing_innocents_accused"] == 0
    assert mixed["attribution_acc"] > 0.9 and mixed["psnr"] > 25  # every image a clean copy's
    blended = point(tiny_model, None, act="all", attack="image_blend", colluders=2)
    assert blended["tracing_innocents_accused"] == 0 and blended["attribution_acc"] < mixed["attribution_acc"]


def test_cuts_without_resize_are_scored_against_the_same_cut_of_the_base(tiny_model, fid_net):
    """crop and shift return smaller images: PSNR compares them with the same cut of the base
    decoder's outputs (a shift alone leaves that PSNR as it was), and no fid_proxy across sizes."""
    assert parse_case("crop_resize_0.5") == ("crop_resize", 0.5, 1)
    assert parse_case("shift_1") == ("shift", 1.0, 1)
    plain = point(tiny_model, fid_net)
    shifted = point(tiny_model, fid_net, attack="shift", strength=1)
    cropped = point(tiny_model, fid_net, attack="crop", strength=0.5)
    assert shifted["fid_proxy"] is None and cropped["fid_proxy"] is None
    assert abs(shifted["psnr"] - plain["psnr"]) < 1.0  # the mark, not a misaligned comparison
    assert cropped["psnr"] > 20


def test_image_attack_and_bad_points(tiny_model, fid_net):
    plain = point(tiny_model, fid_net)
    blurred = point(tiny_model, fid_net, attack="gaussian_blur", strength=2.0)
    assert blurred["attack_strength"] == 2.0 and blurred["psnr"] != pytest.approx(plain["psnr"])
    assert blurred["bit_acc"] < plain["bit_acc"], (blurred["bit_acc"], plain["bit_acc"])
    with pytest.raises(ConfigError, match="unknown ACT type"):
        Point("rotate", "none")
    with pytest.raises(ConfigError, match="fpr must lie in"):
        PointSettings(fpr=1.0)
    with pytest.raises(ConfigError, match="n_images"):
        PointSettings(n_images=1)


def test_spectral_removal_point(tiny_model):
    """spectral_remove filters the copy's outputs towards the attacker's own images' spectrum;
    at strength 0 it is the plain copy."""
    assert parse_case("spectral_remove") == ("spectral_remove", None, 1)
    assert parse_case("spectral_remove_0.5") == ("spectral_remove", 0.5, 1)
    plain = point(tiny_model, None)
    unchanged = point(tiny_model, None, attack="spectral_remove", strength=0.0)
    assert unchanged["bit_acc"] == plain["bit_acc"] and unchanged["psnr"] == pytest.approx(plain["psnr"], abs=0.01)
    filtered = point(tiny_model, None, attack="spectral_remove")
    assert abs(filtered["psnr"] - plain["psnr"]) > 0.1


def test_summary_is_deterministic(tmp_path, tiny_model):
    for num, (act, attack, colluders) in enumerate(
        [("none", "none", 1), ("none", "average", 2), ("all", "average", 2), ("all", "aligned_average", 2)]
    ):
        job = tmp_path / "sweep" / str(num)
        job.mkdir(parents=True)
        m = point(tiny_model, None, act, attack, colluders=colluders, n_images=8, n_innocents=10)
        (job / "metrics.json").write_text(json.dumps(m))
    first = {
        name: (p.read_bytes())
        for name, p in zip(SUMMARY_FILES, write_summary(tmp_path / "sweep"), strict=True)
    }
    second = {
        name: (p.read_bytes())
        for name, p in zip(SUMMARY_FILES, write_summary(tmp_path / "sweep"), strict=True)
    }
    assert first == second
    lines = first["summary.csv"].decode().splitlines()
    assert lines[0].split(",") == list(COLUMNS) and len(lines) == 5
    # the cost of issuing a copy travels to summary.csv, measured (a wall time, never 0)
    issue_cells = [line.split(",")[COLUMNS.index("issue_seconds")] for line in lines[1:]]
    assert all(float(cell) > 0 for cell in issue_cells), issue_cells
    assert "| aligned_average |" in first["summary.md"].decode()
    out = subprocess.run(
        [sys.executable, "-m", "fingerprint_lm.report.summarize", str(tmp_path / "sweep")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "sweep" / "summary.csv").read_bytes() == first["summary.csv"]


def test_multirun_writes_summary_and_skips_on_rerun(tmp_path, sweep_checkpoint):
    sweep_dir = tmp_path / "multirun"
    command = [
        "+experiment=collusion_sweep",
        f"hydra.sweep.dir={sweep_dir}",
        f"paths.root_dir={tmp_path}",
        "method=carrier",
        "act=none",
        "sweep.case=none_c1,average_c2",
        f"sweep.checkpoint={sweep_checkpoint}",
        f"fingerprint_bits={BITS}",
        "sweep.n_images=16",
        "sweep.n_innocents=50",
        "sweep.fid_proxy_steps=5",
    ]
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "WANDB_MODE": "offline"}
    out = run_console(command, cwd=ROOT, env=env)  # in this interpreter: tests/console.py
    assert out.returncode == 0, out.stderr[-3000:]
    rows = (sweep_dir / "summary.csv").read_text().splitlines()
    assert len(rows) == 3
    metrics = [json.loads((sweep_dir / str(i) / "metrics.json").read_text()) for i in range(2)]
    assert {(m["attack"], m["colluders"]) for m in metrics} == {("none", 1), ("average", 2)}
    assert all(m["fingerprint_bits"] == BITS and m["act"] == "none" for m in metrics)

    again = run_console(command, cwd=ROOT, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("already done") + again.stdout.count("already done") >= 2
    assert [json.loads((sweep_dir / str(i) / "metrics.json").read_text()) for i in range(2)] == metrics

    wrong = run_console([*command[:-4], "fingerprint_bits=48", "sweep.n_images=16"], cwd=ROOT, env=env)
    assert wrong.returncode != 0 and "sweep.checkpoint=null trains a model per length" in wrong.stderr
    assert len(wrong.stderr.strip().splitlines()) == 1


def test_wandb_logs_one_offline_run_per_point_and_finishes(tmp_path, sweep_checkpoint, monkeypatch):
    # defers the heavy import of wandb (seconds; nothing else here loads it): only its tests pay for it
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = compose_config(
        tmp_path,
        [
            "+experiment=collusion_sweep",
            "logger=wandb",
            "method=carrier",  # the shared tiny checkpoint's
            "act=none",
            "sweep.case=none_c1",
            f"sweep.checkpoint={sweep_checkpoint}",
            f"fingerprint_bits={BITS}",
            "sweep.n_images=16",
            "sweep.n_innocents=50",
            "sweep.fid_proxy_steps=5",
        ],
        tiny=False,
    )
    assert cfg.logger._target_.endswith("WandbLogger")
    run(cfg)
    assert wandb.run is None  # finished in the finally block, so the next point starts its own run
    offline_runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(offline_runs) == 1
    assert list(offline_runs[0].glob("run-*.wandb"))  # the run's event log was written


def test_sweep_trains_a_model_per_length_once_and_uses_the_shipped_one_where_it_matches(tmp_path):
    """sweep.checkpoint=null: 48 bits with the shipped training config -> the shipped checkpoint;
    another length -> trained once on the shipped base VAE, cached, reused by the next point."""
    fast = [
        "method.steps=8",
        "method.detector_fit_samples=128",
        "eval.max_images=32",
        "data.batch_size=16",
        "sweep.n_images=8",
        "sweep.n_innocents=20",
        "sweep.fid_proxy_steps=0",
        "trainer.enable_progress_bar=false",
    ]

    def point_cfg(job: str, overrides: list[str]):
        cfg = compose_config(
            # carrier: its 8-step model reads (closed-form carriers); pnm's sweep recipe adds a 2000-step second cycle
            tmp_path / job, ["+experiment=collusion_sweep", "method=carrier", "act=none", *overrides], tiny=False
        )
        cfg.paths.cache_dir = str(tmp_path / "cache")  # shared by the jobs, as in one sweep
        return cfg

    first = run(point_cfg("a", ["fingerprint_bits=32", "sweep.case=none_c1", *fast]))
    assert first["model_source"] == "trained" and first["fingerprint_bits"] == 32
    models = list((tmp_path / "cache" / "sweep_models").iterdir())
    trained = [m for m in models if m.is_dir()]
    assert len(trained) == 1 and (trained[0] / "fingerprint.json").is_file()
    meta = json.loads((trained[0] / "fingerprint.json").read_text())
    assert (
        meta["fingerprint_bits"] == 32
        and meta["metrics"]["steps"] == 8
        and meta["metrics"]["bit_acc"] > 0.9  # the carriers are read from step 0 (closed-form reader)
    )
    assert meta["recipe"] == training_recipe(point_cfg("a", ["fingerprint_bits=32", *fast]))
    second = run(point_cfg("b", ["fingerprint_bits=32", "sweep.case=average_c2", *fast]))
    assert (
        second["model_source"] == "cached" and second["point"]["checkpoint"] == first["point"]["checkpoint"]
    )

    shipped = run(
        point_cfg(
            "c",
            [
                "fingerprint_bits=48",
                "sweep.case=none_c1",
                "sweep.n_images=8",
                "sweep.n_innocents=20",
                "sweep.fid_proxy_steps=0",
            ],
        )
    )
    assert shipped["model_source"] == "shipped" and shipped["bit_acc"] > 0.95


def test_a_pnm_model_the_sweep_trains_reads_with_its_content_reader(tmp_path):
    """A length the shipped checkpoint lacks trains pnm on the shipped base VAE, fits its content
    reader last (here on few images, its readout under the attacks too) and caches it with it: the
    sweep's points then read found images with it, as the distributor does."""
    overrides = ["+experiment=collusion_sweep", "method=pnm", "act=none", "fingerprint_bits=16", "method.steps=8",
                 "method.second_cycle=null", "method.issue_screen=null", "method.detector_fit_samples=128",
                 "method.bit_calibration_images=64", "eval.max_images=32", "data.batch_size=16",
                 # pnm.yaml's covariance reads: 2 x 7 x 16 = 224 numbers whitened need more images than that
                 "method.content_reader={unmarked_images: 240, train_images: 240, calibration_images: 64, steps: 20, "
                 "seed: 1, attack_weight: 0.25}", "sweep.case=none_c1", "sweep.n_images=8", "sweep.n_innocents=20",
                 "sweep.fid_proxy_steps=0", "trainer.enable_progress_bar=false"]
    cfg = compose_config(tmp_path / "job", overrides, tiny=False)
    cfg.paths.cache_dir = str(tmp_path / "cache")
    metrics = run(cfg)
    assert metrics["model_source"] == "trained"
    model = load_fingerprint_model(metrics["point"]["checkpoint"])
    assert model.reader is model.content_reader is not None
    assert model.meta["recipe"]["content_reader"]["attack_weight"] == 0.25
    assert model.content_reader.statistics == "covariance" and model.content_reader.read_width == 224
    assert set(model.meta["content_reader"]) >= {"calibration_bit_acc", "attacked_readout_bit_acc"}


@pytest.mark.parametrize("method", ["carrier", "pnm", "wouaf"])
def test_shipped_checkpoints_match_their_method_config_and_no_other_recipe(tmp_path, method):
    """The sweep takes a method's shipped checkpoint only for the training config it records: the
    default config matches it; another recipe (method.train.lr) or step count does not; a
    checkpoint that records no recipe (trained before recipes were recorded) matches on the rest."""
    def record(*overrides):
        cfg = compose_config(tmp_path / "job", ["+experiment=collusion_sweep", f"method={method}", *overrides],
                             tiny=False)
        return training_record(cfg, method_from_config(cfg)), cfg

    default, cfg = record()
    meta = json.loads((shipped_checkpoint(str(cfg.method.checkpoint_name)) / "fingerprint.json").read_text())
    assert matches_shipped(meta, default)
    assert not matches_shipped(meta, record(f"method.shipped_steps={int(cfg.method.steps) + 1}")[0])
    other_lr, _ = record(f"method.train.lr={float(cfg.method.train.lr) * 2}")
    legacy = {key: value for key, value in meta.items() if key != "recipe"}
    assert matches_shipped(legacy, other_lr)
    assert not matches_shipped({**legacy, "recipe": default["recipe"]}, other_lr)


def test_sweep_model_cache_key_follows_the_base_vae_weights(tmp_path):
    """A per-length model cached on one base VAE is not reused after the base VAE is re-pretrained
    (same config.json, new weights); the same bytes give the same key."""
    cfg = compose_config(tmp_path / "job", ["+experiment=collusion_sweep", "fingerprint_bits=32"], tiny=False)
    base = tmp_path / "base_vae"
    shutil.copytree(SHIPPED_CHECKPOINT / "base_vae", base)
    record = training_record(cfg, method_from_config(cfg))
    key = sweep_model_cache_dir(cfg, record, base)
    assert key == sweep_model_cache_dir(cfg, record, base)
    # the point's seed draws users and attacks; the per-length model depends on sweep.train_seed only
    other_seed = compose_config(tmp_path / "job", ["+experiment=collusion_sweep", "fingerprint_bits=32", "seed=3"],
                                tiny=False)
    assert sweep_model_cache_dir(training_config(other_seed), record, base) == sweep_model_cache_dir(
        training_config(cfg), record, base)
    weights = base / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight
    weights.write_bytes(bytes(data))
    assert sweep_model_cache_dir(cfg, record, base) != key


def test_point_on_given_images_and_device_checks(tiny_model):
    """sweep.images=data hands evaluate_point real test images (COCO at scale); shape is checked."""
    resolution = int(tiny_model.meta["resolution"])
    images = torch.rand(6, 3, resolution, resolution) * 2 - 1
    m = point(tiny_model, None, n_images=6, n_innocents=10, images=images)
    assert m["n_images"] == 6 and m["bit_acc"] > 0.8
    with pytest.raises(ConfigError, match="resolution"):
        point(tiny_model, None, n_images=6, images=torch.zeros(6, 3, 8, 8))
    with pytest.raises(ConfigError, match="sweep.device"):
        resolve_device("tpu", "sweep.device")
