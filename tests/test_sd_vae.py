"""Stable Diffusion's VAE from a local folder: SD block layout, PNM sites, gradient checkpointing,
frozen encoder, bf16 mixed precision, the end-to-end run and bad paths.

Everything runs on a tiny ``AutoencoderKL`` with SD's layout (4 levels, 2 ResnetBlocks per down
block and 3 per up block, mid-block attention) written to a temp folder; the real SD widths are
checked on the meta device (shapes only, no memory).
"""

from __future__ import annotations

import copy
import json

import lightning as L
import pytest
import torch
from diffusers import AutoencoderKL
from lightning.pytorch.utilities.testing import _runif_reasons
from torch.utils.data import DataLoader

from fingerprint_lm.distributor.copies import write_copy
from fingerprint_lm.errors import CheckpointError, ConfigError
from fingerprint_lm.lit.base_vae import BaseVAEModule
from fingerprint_lm.lit.fingerprinting import FingerprintModule
from fingerprint_lm.lit.worst_case import worst_case_perturbation
from fingerprint_lm.methods import personal_tensors
from fingerprint_lm.models.augment import AugmentConfig
from fingerprint_lm.models.checkpoint import build_fingerprint_model, load_fingerprint_model
from fingerprint_lm.models.pnm import PersonalizedDecoder
from fingerprint_lm.models.vae import SD_VAE_CONFIG, encoder_parameters, load_vae
from fingerprint_lm.tasks import run
from tests.conftest import DEBUG_TINY, compose_config

TINY_SD_LAYOUT = {
    **SD_VAE_CONFIG,
    "block_out_channels": [8, 16, 16, 16],
    "norm_num_groups": 4,
    "sample_size": 32,
}
SD_NORM2_SITES = [
    "mid_block.resnets.0.norm2",
    "mid_block.resnets.1.norm2",
    *[f"up_blocks.{b}.resnets.{r}.norm2" for b in range(4) for r in range(3)],
]
NO_AUGMENT = AugmentConfig(p_noise=0, p_blur=0, p_jpeg=0, p_crop=0, p_brightness=0)


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    """A randomly initialised tiny VAE with SD's block layout, saved as a diffusers folder."""
    torch.manual_seed(0)
    vae = AutoencoderKL(**TINY_SD_LAYOUT)
    folder = tmp_path_factory.mktemp("sd") / "vae"
    vae.save_pretrained(folder, safe_serialization=True)
    return folder


def _pnm(vae, bits=16, conv_sites=(), **kwargs):
    pnm_kwargs = {"tile_size": 8, "mapping_hidden": 16, "conv_sites": conv_sites}
    model = build_fingerprint_model(vae, bits, pnm_kwargs, {"cnn_channels": (8,)})
    for key, value in kwargs.items():
        setattr(model.pnm, key, value)
    return model


def _randomise_heads(pnm: PersonalizedDecoder, std: float = 0.1) -> None:
    with torch.no_grad():
        for head in [*pnm.affine_heads.values(), *pnm.conv_heads.values()]:
            head.weight.normal_(0, std)


# -- (a) loading ------------------------------------------------------------------------------
def test_load_vae_from_an_sd_layout_folder(sd_folder):
    vae = load_vae(sd_folder)
    assert vae.config.scaling_factor == pytest.approx(0.18215)
    assert list(vae.config.block_out_channels) == [8, 16, 16, 16]
    assert len(vae.decoder.up_blocks) == 4 and all(len(b.resnets) == 3 for b in vae.decoder.up_blocks)
    assert vae.decoder.mid_block.attentions[0] is not None
    half = load_vae(sd_folder, dtype=torch.bfloat16)
    assert half.decoder.conv_in.weight.dtype == torch.bfloat16
    for key, value in vae.state_dict().items():
        assert torch.equal(value.to(torch.bfloat16), half.state_dict()[key]), key


# -- (b) PNM sites ----------------------------------------------------------------------------
def test_pnm_finds_the_14_norm2_sites_of_the_real_sd_decoder():
    # SD 1/2's decoder (128/256/512/512, 32 groups) on the meta device: shapes only, no memory
    with torch.device("meta"):
        vae = AutoencoderKL(**SD_VAE_CONFIG)
    pnm = PersonalizedDecoder(vae.decoder, 48, post_quant_conv=vae.post_quant_conv)
    assert pnm.affine_site_names == sorted(SD_NORM2_SITES)
    widths = {name: pnm.decoder.get_submodule(name).num_channels for name in pnm.affine_site_names}
    assert sorted(widths.values()) == [128] * 3 + [256] * 3 + [512] * 8
    assert all(pnm.decoder.get_submodule(n).num_groups == 32 for n in widths)
    assert pnm.decoder.conv_norm_out.num_channels == 128
    # the private PNM stays small next to the 49M-parameter decoder it modulates
    assert pnm.carriers.shape == (48, 128, 16, 16)
    heads = sum(p.numel() for p in pnm.affine_heads.parameters())
    assert heads == sum(2 * c * (128 + 1) for c in widths.values())  # 1.35M
    assert sum(p.numel() for p in pnm.pnm_parameters()) < 3_100_000


def test_zero_modulation_reproduces_the_sd_layout_decoder_exactly(sd_folder):
    vae = load_vae(sd_folder)
    reference = copy.deepcopy(vae)
    model = _pnm(vae)
    assert model.pnm.affine_site_names == sorted(SD_NORM2_SITES)
    assert model.pnm.spatial_site_name == "conv_norm_out"
    with torch.no_grad():
        model.pnm.carrier_log_amplitude.fill_(-torch.inf)  # carriers off; heads start at zero
        latents = torch.randn(2, 4, 4, 4)
        expected = reference.decode(latents).sample
        assert torch.equal(model.pnm(latents, torch.randint(0, 2, (2, 16))), expected)
        assert torch.equal(model.pnm(latents, None), expected)
        model.pnm.gradient_checkpointing = True  # no grad: the stock forward either way
        assert torch.equal(model.pnm(latents, None), expected)


# -- (c) gradient checkpointing ---------------------------------------------------------------
def _gradients(sd_folder, checkpointing: bool):
    torch.manual_seed(1)
    vae = load_vae(sd_folder)
    # conv sites too (method=wouaf): their modulation must reach the recomputed blocks as well
    model = _pnm(vae, conv_sites=["up_blocks.*.resnets.*.conv1"], gradient_checkpointing=checkpointing)
    _randomise_heads(model.pnm)
    model.pnm.decoder.requires_grad_(True)  # gradients through the decoder weights too
    calls = []
    model.pnm.decoder.up_blocks[3].register_forward_pre_hook(lambda *_: calls.append(1))
    latents = torch.randn(2, 4, 4, 4)
    bits = torch.randint(0, 2, (2, 16))
    out = model.pnm(latents, bits)
    loss = (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum() + out.square().mean()
    params = dict(model.pnm.named_parameters())
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    return out.detach(), dict(zip(params, grads)), len(calls)


def test_gradient_checkpointing_gives_the_same_gradients(sd_folder):
    out_plain, grads_plain, calls_plain = _gradients(sd_folder, checkpointing=False)
    out_ckpt, grads_ckpt, calls_ckpt = _gradients(sd_folder, checkpointing=True)
    assert (calls_plain, calls_ckpt) == (1, 2)  # the block really was recomputed in backward
    assert torch.equal(out_plain, out_ckpt)
    assert grads_plain.keys() == grads_ckpt.keys()
    for name, grad in grads_plain.items():
        if grad is None:
            assert grads_ckpt[name] is None, name
            continue
        assert torch.allclose(grad, grads_ckpt[name], rtol=1e-5, atol=1e-7), name
    # the modulation reached the recomputed blocks: heads and carriers get gradients
    assert grads_ckpt["affine_heads.up_blocks__3__resnets__2__norm2.weight"].abs().sum() > 0
    assert grads_ckpt["carriers"].abs().sum() > 0
    assert grads_ckpt["conv_heads.up_blocks__3__resnets__2__conv1.weight"].abs().sum() > 0


def _fingerprint_module(vae, checkpointing=False, **kwargs):
    model = _pnm(vae, gradient_checkpointing=checkpointing)
    return FingerprintModule(vae, model.pnm, model.extractor, augment=NO_AUGMENT, **kwargs)


def _manual_step(module, images):
    optimizer = module.configure_optimizers()
    module.optimizers = lambda: optimizer
    module.manual_backward = lambda loss: loss.backward()
    logged = {}
    module.log_dict = lambda d, **kw: logged.update(d)
    module.log = lambda name, value, **kw: logged.update({name: value})
    module.training_step({"image": images}, 0)
    return logged


def test_worst_case_step_with_checkpointing_matches_the_plain_step(sd_folder):
    images = torch.rand(4, 3, 32, 32) * 2 - 1
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(2)
        module = _fingerprint_module(load_vae(sd_folder), checkpointing, wc_steps=2, wc_rho=0.05)
        _randomise_heads(module.pnm)
        logged = _manual_step(module, images)
        results.append((logged, [p.detach().clone() for p in module.pnm.pnm_parameters()]))
    (log_plain, params_plain), (log_ckpt, params_ckpt) = results
    for key in ("train/loss", "train/bce", "train/bce_wc"):
        assert torch.allclose(log_plain[key], log_ckpt[key], rtol=1e-5), key
    for a, b in zip(params_plain, params_ckpt):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


# -- (d) frozen encoder, bf16 mixed precision -------------------------------------------------
class _Images(torch.utils.data.Dataset):
    def __init__(self, n=8, size=32):
        self.images = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(3)) * 2 - 1

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i]}


def test_bf16_mixed_training_step_keeps_the_encoder_frozen(sd_folder):
    torch.manual_seed(4)
    vae = load_vae(sd_folder)
    module = _fingerprint_module(vae, checkpointing=True, wc_steps=1, train_decoder=True)
    encoder_before = [p.detach().clone() for p in encoder_parameters(vae)]
    decoder_before = [p.detach().clone() for p in module.decoder_weights()]
    pnm_before = [p.detach().clone() for p in module.pnm.pnm_parameters()]
    encoder_grad_mode, decoder_dtypes = [], []
    vae.encoder.register_forward_hook(lambda *_: encoder_grad_mode.append(torch.is_grad_enabled()))
    vae.decoder.conv_out.register_forward_hook(lambda _m, _i, out: decoder_dtypes.append(out.dtype))

    trainer = L.Trainer(accelerator="cpu", devices=1, precision="bf16-mixed", max_steps=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0)
    trainer.fit(module, train_dataloaders=DataLoader(_Images(), batch_size=4))

    assert trainer.global_step == 2
    assert torch.bfloat16 in decoder_dtypes  # autocast really was on
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    assert torch.isfinite(trainer.callback_metrics["train/bce_wc"])
    # the encoder: no gradients, no optimizer, unchanged; it ran only under no_grad
    assert encoder_grad_mode and not any(encoder_grad_mode)
    assert all(not p.requires_grad for p in encoder_parameters(vae))
    assert not vae.encoder.training
    encoder_ids = {id(p) for p in encoder_parameters(vae)}
    for group in trainer.optimizers[0].param_groups:
        assert not any(id(p) in encoder_ids for p in group["params"])
    for before, after in zip(encoder_before, encoder_parameters(vae)):
        assert torch.equal(before, after)
    # what is trained moved: the PNM and (train_decoder=True) the decoder weights
    assert any(not torch.equal(a, b) for a, b in zip(pnm_before, module.pnm.pnm_parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(decoder_before, module.decoder_weights()))
    assert all(p.dtype == torch.float32 for p in module.parameters())  # mixed precision, fp32 master weights


def test_base_vae_pretraining_with_a_frozen_encoder_trains_the_decoder_only(sd_folder):
    torch.manual_seed(8)
    vae = load_vae(sd_folder)
    encoder_before = [p.detach().clone() for p in encoder_parameters(vae)]
    decoder_before = [p.detach().clone() for p in vae.decoder.parameters()]
    module = BaseVAEModule(vae, freeze_encoder=True)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, train_dataloaders=DataLoader(_Images(), batch_size=4))
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert not optimized & {id(p) for p in encoder_parameters(vae)}
    for before, after in zip(encoder_before, encoder_parameters(vae)):
        assert torch.equal(before, after)
    assert any(not torch.equal(a, b) for a, b in zip(decoder_before, vae.decoder.parameters()))


def test_bf16_weights_train_and_the_perturbation_is_undone_exactly(sd_folder):
    torch.manual_seed(5)
    vae = load_vae(sd_folder, dtype=torch.bfloat16)
    module = _fingerprint_module(vae, wc_steps=1, wc_rho=0.05)
    decoder_before = {k: v.clone() for k, v in module.pnm.decoder.state_dict().items()}
    logged = _manual_step(module, torch.rand(4, 3, 32, 32) * 2 - 1)
    assert all(torch.isfinite(logged[k]) for k in ("train/loss", "train/bce", "train/bce_wc"))
    assert logged["train/bce"].dtype == torch.float32  # losses in fp32 from bf16 activations
    for key, value in module.pnm.decoder.state_dict().items():
        assert torch.equal(value, decoder_before[key]), key
    assert module.pnm.mapping.net[0].weight.dtype == torch.float32  # private PNM stays fp32


def test_worst_case_perturbation_is_made_in_fp32_and_returned_in_the_param_dtype():
    torch.manual_seed(6)
    param = torch.nn.Parameter(torch.randn(64, 64).to(torch.bfloat16))
    grad = torch.randn(64, 64).to(torch.bfloat16)
    (delta,) = worst_case_perturbation([param], [grad], rho=0.01)
    assert delta.dtype == torch.bfloat16
    assert delta.float().norm() == pytest.approx(0.01 * param.float().norm().item(), rel=1e-2)


# -- (e) end to end ---------------------------------------------------------------------------
# debug=tiny with model=sd_vae: the command line's model choice wins over the overlay, whose tiny
# vae_config and pretraining steps a pretrained model ignores.
NON_MODEL_TINY = DEBUG_TINY


def test_run_trains_on_an_sd_vae_folder(tmp_path, sd_folder):
    cfg = compose_config(tmp_path, [
        *NON_MODEL_TINY, "model=sd_vae", f"model.path={sd_folder}", "model.calibration_batch_size=16",
        "method=carrier", "fingerprint_bits=8", "method.steps=4", "method.pnm.tile_size=8",
        "method.detector_fit_samples=64",
        "data.resolution=32", "data.batch_size=4", "data.test_size=8", "eval.max_images=8",
        "trainer.val_check_interval=4",
    ], tiny=False)
    assert cfg.model.gradient_checkpointing and cfg.model.freeze_encoder
    metrics = run(cfg)
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert written["steps"] == 4 and written["eval_images"] == 8
    assert written["vae_scaling_factor"] == pytest.approx(0.18215)
    assert written["base_vae"] == str(sd_folder)
    assert written["bit_acc"] == metrics["bit_acc"] and metrics["psnr"] > 10
    # the saved base VAE is the folder's, untouched (the encoder was never trained)
    saved = load_vae(tmp_path / "run" / "fingerprint_model" / "base_vae")
    original = load_vae(sd_folder)
    for key, value in original.state_dict().items():
        assert torch.equal(value, saved.state_dict()[key]), key


# -- (f) bad input ----------------------------------------------------------------------------
def _sd_cfg(tmp_path, *overrides):
    return compose_config(tmp_path, [*NON_MODEL_TINY, "model=sd_vae", *overrides], tiny=False)


def test_bad_sd_vae_settings_are_one_line_errors(tmp_path, sd_folder):
    with pytest.raises(CheckpointError, match="config.json missing") as info:
        run(_sd_cfg(tmp_path, "model.path=/nonexistent"))
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="model.path is required"):
        run(_sd_cfg(tmp_path))  # path: ??? left unset
    with pytest.raises(ConfigError, match="scaling_factor"):
        run(_sd_cfg(tmp_path, f"model.path={sd_folder}", "model.scaling_factor=0.13025"))
    with pytest.raises(ConfigError, match="dtype"):
        run(_sd_cfg(tmp_path, f"model.path={sd_folder}", "model.dtype=float8"))
    # a whole pipeline folder instead of its vae/ subfolder: say where the VAE is
    pipeline = tmp_path / "sd_pipeline"
    (pipeline / "vae").mkdir(parents=True)
    (pipeline / "model_index.json").write_text("{}")
    (pipeline / "vae" / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="point at its VAE"):
        load_vae(pipeline)
    assert not (tmp_path / "run" / "metrics.json").exists()


# -- GPU --------------------------------------------------------------------------------------
_GPU_REASONS, _GPU_MARKER_KWARGS = _runif_reasons(min_cuda_gpus=1, bf16_cuda=True)


@pytest.mark.skipif(bool(_GPU_REASONS), reason=f"requires {' + '.join(_GPU_REASONS)}", **_GPU_MARKER_KWARGS)
def test_bf16_mixed_step_on_gpu(sd_folder):
    torch.manual_seed(7)
    vae = load_vae(sd_folder)
    module = _fingerprint_module(vae, checkpointing=True, wc_steps=1)
    trainer = L.Trainer(accelerator="gpu", devices=1, precision="bf16-mixed", max_steps=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0)
    trainer.fit(module, train_dataloaders=DataLoader(_Images(), batch_size=4))
    assert torch.isfinite(trainer.callback_metrics["train/loss"])


def test_method_pnm_runs_on_an_sd_vae_folder_and_its_copy_is_stock(tmp_path, sd_folder):
    """model=sd_vae with method=pnm: every ResnetBlock norm and conv_norm_out of the SD-layout
    decoder carries the code (gradient checkpointing on, as model=sd_vae sets it); the copy
    from_pretrained-loads as the PNM decoder."""
    cfg = compose_config(tmp_path, [
        *NON_MODEL_TINY, "model=sd_vae", f"model.path={sd_folder}", "model.calibration_batch_size=16",
        "method=pnm", "fingerprint_bits=8", "method.steps=4", "method.detector_fit_samples=64",
        "method.bit_calibration_images=64",
        "data.resolution=32", "data.batch_size=4", "data.test_size=8", "eval.max_images=8",
        "trainer.val_check_interval=4",
    ], tiny=False)
    assert cfg.model.gradient_checkpointing  # the checkpointed decode path carries the modulation
    metrics = run(cfg)
    assert metrics["steps"] == 4
    model = load_fingerprint_model(metrics["checkpoint"])
    assert model.method == "pnm" and "conv_norm_out" in model.pnm.affine_site_names
    norms = [n for n, m in model.pnm.decoder.named_modules() if isinstance(m, torch.nn.GroupNorm)]
    assert model.pnm.affine_site_names == sorted(n for n in norms if "attentions" not in n)
    code = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0])
    with torch.no_grad():
        # 4 steps move the heads little: set them so the code matters (what is checked here is the
        # copy of an SD-layout decoder, not what 4 steps learned)
        for head in model.pnm.affine_heads.values():
            head.weight.normal_(0, 0.02)
        state, bias_map, _ = personal_tensors(model, code.numpy(), "permute", act_seed=1)
        assert bias_map is None
        write_copy(tmp_path / "copy", model.vae.config, state)
        latents = torch.randn(1, 4, 4, 4)
        stock = AutoencoderKL.from_pretrained(tmp_path / "copy").eval()
        assert (stock.decode(latents).sample - model.pnm(latents, code[None])).abs().max() <= 1e-5

