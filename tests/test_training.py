"""Training: the worst-case step, a short run, metrics.json, resume, bad input, VAE round trip."""

from __future__ import annotations

import json

import pytest
import torch
from omegaconf import OmegaConf

from fingerprint_lm.errors import CheckpointError, ConfigError, DataError
from fingerprint_lm.lit.fingerprinting import FingerprintModule
from fingerprint_lm.lit.worst_case import worst_case_perturbation
from fingerprint_lm.models.augment import AugmentConfig
from fingerprint_lm.models.checkpoint import load_fingerprint_model, shipped_checkpoint
from fingerprint_lm.models.content_reader import LossReader
from fingerprint_lm.models.extractor import FingerprintExtractor
from fingerprint_lm.models.pnm import PersonalizedDecoder
from fingerprint_lm.models.pooled_extractor import BandEnergyExtractor
from fingerprint_lm.models.vae import build_vae, load_vae
from fingerprint_lm.tasks import run
from fingerprint_lm.tasks.train import after_fit_device
from tests.conftest import ROOT, compose_config
from tests.console import run_console

SMALL_VAE = dict(
    block_out_channels=[8, 16], down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2, norm_num_groups=4, latent_channels=4, layers_per_block=1,
)


def test_the_work_around_fit_runs_on_this_ranks_gpu_unless_the_trainer_is_told_cpu(default_cfg, monkeypatch):
    """The content reader's fit and the screen's probe reads (days of a CPU at SD's size) go to this
    rank's GPU (LOCAL_RANK: under DDP each rank fits the reader a later cycle reads) when the trainer
    may use one (trainer=gpu, auto, ddp), and stay on the CPU under trainer=cpu (the default), GPU or
    not. A 2-GPU machine is simulated; no tensor is made on it."""
    gpu_cfg = OmegaConf.merge(default_cfg, {"trainer": {"accelerator": "gpu"}})
    assert default_cfg.trainer.accelerator == "cpu"
    assert after_fit_device(gpu_cfg) == torch.device("cpu")  # no GPU here
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert after_fit_device(gpu_cfg) == torch.device("cuda", 1)
    assert after_fit_device(default_cfg) == torch.device("cpu")


def test_worst_case_perturbation_has_the_specified_radius_and_direction():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))]
    grads = [torch.randn(4, 3), torch.randn(5)]
    deltas = worst_case_perturbation(params, grads, rho=0.05)
    for p, g, d in zip(params, grads, deltas):
        assert torch.allclose(d.norm(), 0.05 * p.norm(), rtol=1e-5)
        assert torch.allclose(d / d.norm(), g / g.norm(), atol=1e-6)
    # a second step stays inside the ball
    again = worst_case_perturbation(params, grads, rho=0.05, previous=deltas)
    for p, d in zip(params, again):
        assert d.norm() <= 0.05 * p.norm() * (1 + 1e-5)


def _module(wc_steps: int, rho: float = 0.05, **kwargs):
    torch.manual_seed(0)
    vae = build_vae(SMALL_VAE)
    pnm = PersonalizedDecoder(vae.decoder, 16, tile_size=8, mapping_hidden=16)
    extractor = FingerprintExtractor(16, tile_size=8, cnn_channels=(8,))
    no_augment = AugmentConfig(p_noise=0, p_blur=0, p_jpeg=0, p_crop=0, p_brightness=0)  # deterministic losses
    return FingerprintModule(vae, pnm, extractor, wc_steps=wc_steps, wc_rho=rho, augment=no_augment, **kwargs)


def _one_step(module: FingerprintModule, images):
    optimizer = module.configure_optimizers()
    module.optimizers = lambda: optimizer
    module.manual_backward = lambda loss: loss.backward()
    logged = {}
    module.log_dict = lambda d, **kw: logged.update(d)
    module.log = lambda name, value, **kw: logged.update({name: value})
    module.training_step({"image": images}, 0)
    return logged


def test_one_worst_case_step_perturbs_then_restores_decoder_and_updates_the_pnm():
    module = _module(wc_steps=1)
    decoder_before = {k: v.clone() for k, v in module.pnm.decoder.state_dict().items()}
    pnm_before = [p.detach().clone() for p in module.pnm.pnm_parameters()]
    images = torch.rand(8, 3, 16, 16) * 2 - 1
    logged = _one_step(module, images)
    # the decoder (what a user holds) is restored exactly after the perturbed pass
    for key, value in module.pnm.decoder.state_dict().items():
        if not any(torch.equal(value, p) for p in pnm_before):
            assert torch.equal(value, decoder_before[key]), key
    assert any(not torch.equal(a, b.detach()) for a, b in zip(pnm_before, module.pnm.pnm_parameters()))
    assert all(not p.requires_grad for p in module.decoder_weights())
    # gradient ascent inside the ball makes the fingerprint loss worse, not better
    assert logged["train/bce_wc"] > logged["train/bce"]


def test_a_trained_shared_decoder_is_measured_against_the_base_as_it_was():
    module = _module(wc_steps=1, train_decoder=True, decoder_lr=1e-2)
    latents = module.encode(torch.rand(4, 3, 16, 16) * 2 - 1)
    before = module.reference(latents).clone()
    assert torch.equal(before, module.pnm(latents, None).detach())
    _one_step(module, torch.rand(8, 3, 16, 16) * 2 - 1)
    # the shared decoder moved (its unmarked output changed); the reference did not
    assert not torch.allclose(module.pnm(latents, None).detach(), before)
    assert torch.equal(module.reference(latents), before)
    assert not any(p.requires_grad for p in module.reference_pnm.parameters())
    assert _module(wc_steps=0).reference_pnm is None  # nothing to keep when the decoder is frozen
    # a Lightning checkpoint written before the reference existed still resumes (strict load)
    state = {k: v for k, v in module.state_dict().items() if not k.startswith("reference_pnm.")}
    checkpoint = {"state_dict": state}
    module.on_load_checkpoint(checkpoint)
    module.load_state_dict(checkpoint["state_dict"])
    assert torch.equal(module.reference(latents), before)


def test_plain_step_has_no_worst_case_term():
    module = _module(wc_steps=0)
    logged = _one_step(module, torch.rand(8, 3, 16, 16) * 2 - 1)
    assert float(logged["train/bce_wc"]) == 0.0


def test_short_training_run_learns_a_readable_fingerprint(tiny_cfg):
    metrics = run(tiny_cfg(["method=carrier", "fingerprint_bits=16", "method.steps=40"]))  # a 40-step pnm reads ~0.6
    assert metrics["bit_acc"] > 0.8, metrics  # chance is 0.5
    assert metrics["psnr"] > 20
    assert metrics["steps"] == 40
    written = json.loads(open(metrics["checkpoint"].replace("fingerprint_model", "metrics.json")).read())
    for key in ("bit_acc", "psnr", "ssim", "fingerprint_bits", "train_seconds", "steps", "task_seconds"):
        assert key in written
    assert written["task_seconds"] > written["train_seconds"]  # the task's wall time holds the training's
    assert written["fingerprint_bits"] == 16
    # the carrier's last hook whitened the reader's soft-decision weights on unmarked outputs
    assert written["soft_whitened"] is True
    reader = load_fingerprint_model(metrics["checkpoint"]).extractor
    assert not torch.equal(reader.soft_whitening, torch.eye(16))


@pytest.mark.slow  # ~12 s: the carrier baseline's readers learning with no closed-form start; the default pnm's
# learning from the loss is in make test (test_methods: a short training read through a stock-loaded copy)
def test_gradient_training_alone_lifts_bit_accuracy(tiny_cfg):
    # no closed-form start: the readers learn from the loss alone
    before = run(tiny_cfg(["method=carrier", "fingerprint_bits=8", "method.steps=1", "method.detector_fit_samples=0"]))
    after = run(tiny_cfg(["method=carrier", "fingerprint_bits=8", "method.steps=120", "method.detector_fit_samples=0",
                          "resume=false", "method.train.lr=3e-3"]))
    assert after["bit_acc"] > max(0.65, before["bit_acc"] + 0.1), (before["bit_acc"], after["bit_acc"])


def test_bad_input_gives_clear_errors(tiny_cfg, tmp_path):
    with pytest.raises(ConfigError, match="positive"):
        run(tiny_cfg(["fingerprint_bits=0"]))
    with pytest.raises(ConfigError, match="divisible"):
        run(tiny_cfg(["data.resolution=15"]))
    with pytest.raises(DataError, match="missing"):
        run(tiny_cfg(["data=coco", f"data.coco_root={tmp_path}/missing", "data.resolution=16"]))
    with pytest.raises(ConfigError, match="method.steps"):
        run(tiny_cfg(["method.steps=abc"]))
    with pytest.raises(ConfigError, match="accelerator") as info:
        run(tiny_cfg(["trainer.accelerator=bogus"]))
    assert "\n" not in str(info.value)
    assert not (tmp_path / "cache").exists()  # rejected before any base VAE work
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_cli_bad_input_is_one_line_and_nonzero(tmp_path):
    result = run_console(["fingerprint_bits=0", "logger=none", f"paths.root_dir={tmp_path}"], cwd=ROOT)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: fingerprint_bits must be a positive")
    assert "Traceback" not in result.stderr


def test_base_vae_save_load_round_trip_is_bit_exact(tmp_path):
    torch.manual_seed(0)
    vae = build_vae(SMALL_VAE)
    vae.save_pretrained(tmp_path / "vae")
    loaded = load_vae(tmp_path / "vae")
    vae.eval()  # from_pretrained returns eval mode; attention numerics differ between the modes
    for key, value in vae.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    latents = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        assert torch.equal(vae.decode(latents).sample, loaded.decode(latents).sample)


def test_truncated_vae_folder_is_a_checkpoint_error(tmp_path):
    vae = build_vae(SMALL_VAE)
    vae.save_pretrained(tmp_path / "vae")
    weights = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError):
        load_vae(tmp_path / "vae")
    with pytest.raises(CheckpointError, match="config.json"):
        load_vae(tmp_path / "nowhere")



def test_init_from_continues_the_shipped_pnm_model_and_records_it(tmp_path):
    """init_from=shipped: two steps at a negligible rate keep the shipped model's reading (a fresh
    model reads chance after two steps), fidelity stays measured against the base as it was, and
    the new checkpoint records that it is a fine-tune (so the sweep never takes it for the shipped one)."""
    quick = ["method=pnm", "init_from=shipped", "method.steps=2", "method.train.lr=1e-6",
             "method.train.decoder_lr=1e-6", "method.detector_fit_samples=256", "method.bit_calibration_images=256",
             "eval.max_images=128", "eval.issue_predictor_codes=0", "logger=none",  # no read predictor fit (~15 min)
             # the content reader (its energy reads: 96 numbers whiten on fewer images than pnm.yaml's 672) and
             # the screen's floors fitted anew on fewer codes (pnm.yaml's 768 probe reads took 295 s)
             "method.content_reader={unmarked_images: 256, train_images: 512, steps: 200, calibration_images: 256, "
             "seed: 91, statistics: energy}", "method.issue_screen.candidates=16",
             "method.issue_screen.rate_candidates=16"]
    metrics = run(compose_config(tmp_path, quick, tiny=False))
    # the shipped model: 0.938 at 29.9 dB with the band reader (the training run's images), 0.97 with its content reader
    assert metrics["bit_acc"] > 0.85 and metrics["psnr"] > 29.0, metrics
    assert metrics["content_reader"]["calibration_bit_acc"] > 0.85, metrics["content_reader"]  # refitted on the tune
    assert metrics["init_from"].endswith("embedded_pnm")
    recorded = json.loads((tmp_path / "run" / "fingerprint_model" / "fingerprint.json").read_text())
    assert recorded["recipe"]["init_from"] == "shipped"
    with pytest.raises(ConfigError, match="fingerprint_bits differ"):
        run(compose_config(tmp_path, [*quick, "fingerprint_bits=32"], tiny=False))
    # a model continued, not built, is checked before training too: 512 images cannot whiten 672 covariance reads
    with pytest.raises(ConfigError, match="train_images must exceed the 672 numbers the reader whitens"):
        run(compose_config(tmp_path, [*quick, "method.content_reader.statistics=covariance"], tiny=False))
    with pytest.raises(ConfigError, match="init_from=.*no fingerprint checkpoint there"):
        run(compose_config(tmp_path, ["method=pnm", f"init_from={tmp_path / 'nothing'}"]))


def test_a_second_cycle_trains_on_from_the_first_in_the_same_run(tiny_cfg, tmp_path, caplog):
    """method.second_cycle: the first cycle's model trains on for the second cycle's steps at its
    rates (the trainer's max_steps follows); the curve covers both cycles; the record keeps the
    first cycle's steps and names the second cycle (what the sweep matches the shipped pnm model
    on); a rerun in the same folder restarts from the kept first cycle instead of repeating it."""
    overrides = ["method=pnm", "fingerprint_bits=8", "method.steps=10", "method.second_cycle={steps:6,train:{lr:1e-4}}",
                 "method.bit_calibration_images=64"]
    metrics = run(tiny_cfg(overrides))
    assert (metrics["steps"], metrics["second_cycle_steps"]) == (10, 6)
    curve = (tmp_path / "run" / "training_curve.csv").read_text().splitlines()
    assert curve[-1].split(",")[0] == "16", curve[-3:]  # steps 1..10, then 11..16
    recorded = json.loads((tmp_path / "run" / "fingerprint_model" / "fingerprint.json").read_text())
    assert recorded["recipe"]["second_cycle"] == {"steps": 6, "train": {"lr": 1e-4}}
    assert recorded["metrics"]["steps"] == 10
    first = json.loads((tmp_path / "run" / "first_cycle_model" / "fingerprint.json").read_text())
    assert "second_cycle" not in first["recipe"] and first["metrics"]["steps"] == 10
    caplog.clear()
    with caplog.at_level("INFO", logger="fingerprint_lm.tasks.train"):
        rerun = run(tiny_cfg(overrides))
    assert "the first cycle's model is at" in caplog.text
    assert (rerun["steps"], rerun["second_cycle_steps"]) == (10, 6)


def test_a_later_cycle_can_read_with_the_content_reader(tiny_cfg, tmp_path, caplog):
    """method.second_cycle as a list: the cycles run in order; one with read_with=content_reader has
    the content reader fitted first and its loss read by it, which trains the decoder but leaves the
    reader's base VAE (the fidelity reference, saved as reference_vae/) as it was."""
    cycles = "[{steps:4,train:{lr:1e-4}},{steps:3,read_with:content_reader}]"
    reader = ("method.content_reader={unmarked_images: 64, train_images: 64, calibration_images: 64, steps: 20, "
              "seed: 1, attack_weight: 0.25}")
    overrides = ["method=pnm", "fingerprint_bits=8", "method.steps=10", f"method.second_cycle={cycles}", reader,
                 "method.bit_calibration_images=64"]
    with caplog.at_level("INFO", logger="fingerprint_lm.tasks.train"):
        metrics = run(tiny_cfg(overrides))
    assert (metrics["steps"], metrics["second_cycle_steps"]) == (10, 7)
    assert "3 steps from the 14-step model, the loss read by its content_reader" in caplog.text
    assert "4 steps from the 10-step model, the loss read by its extractor" in caplog.text
    curve = (tmp_path / "run" / "training_curve.csv").read_text().splitlines()
    assert curve[-1].split(",")[0] == "17", curve[-3:]
    model = load_fingerprint_model(tmp_path / "run" / "fingerprint_model")
    assert model.meta["recipe"]["second_cycle"] == [{"steps": 4, "train": {"lr": 1e-4}},
                                                    {"steps": 3, "read_with": "content_reader"}]
    base = load_vae(metrics["base_vae"])
    assert all(torch.equal(value, base.state_dict()[key]) for key, value in model.reference_vae.state_dict().items())
    trained, before = model.vae.decoder.state_dict(), base.decoder.state_dict()
    assert any(not torch.equal(trained[key], before[key]) for key in before)  # the shared decoder trained


def test_the_loss_reader_holds_no_tensor_of_the_reader_it_reads():
    reader = BandEnergyExtractor(8)
    through = LossReader(reader)
    assert list(through.parameters()) == [] and list(through.buffers()) == []
    images = torch.rand(2, 3, 16, 16, requires_grad=True)
    through(images).sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert torch.equal(through(images), reader(images))


def test_the_shipped_recipe_trains_two_cycles_and_a_debug_run_one(tmp_path):
    """+experiment=train (make checkpoint) and the sweep train pnm's shipped second cycle; carrier
    has none; debug=tiny leaves it out."""
    shipped = compose_config(tmp_path, ["+experiment=train", "method=pnm"], tiny=False).method
    assert shipped.second_cycle == shipped.shipped_second_cycle
    assert [cycle.get("read_with", "extractor") for cycle in shipped.second_cycle] == ["extractor", "content_reader"]
    assert compose_config(tmp_path, ["+experiment=train", "method=carrier"], tiny=False).method.second_cycle is None
    assert compose_config(tmp_path, ["+experiment=train", "method=pnm"]).method.second_cycle is None
    assert compose_config(tmp_path, ["method=pnm"], tiny=False).method.second_cycle is None


def test_a_given_reference_vae_is_the_modules_fidelity_reference():
    """A continued model's shared decoder has moved from the base: with ``reference_vae`` the module
    measures fidelity against the base as it was, without it against the decoder as it is."""
    model = load_fingerprint_model(shipped_checkpoint("embedded_pnm"))
    key = "conv_out.weight"
    assert not torch.equal(model.vae.decoder.state_dict()[key], model.reference_vae.decoder.state_dict()[key])
    continued = FingerprintModule(model.vae, model.pnm, model.extractor, reference_vae=model.reference_vae,
                                  train_decoder=True)
    assert torch.equal(continued.reference_pnm.decoder.state_dict()[key], model.reference_vae.decoder.state_dict()[key])
    fresh = FingerprintModule(model.vae, model.pnm, model.extractor, train_decoder=True)
    assert torch.equal(fresh.reference_pnm.decoder.state_dict()[key], model.vae.decoder.state_dict()[key])
