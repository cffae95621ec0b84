"""Methods behind one interface: method=pnm copies are stock diffusers folders that reproduce the
distributor's PNM decoder; the shift-invariant extractors; config checks of the method group."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL
from omegaconf import OmegaConf

from fingerprint_lm.distributor.copies import CONFIG_NAME, WEIGHTS_NAME, load_copy, write_copy
from fingerprint_lm.distributor.generation import decode_with, held_out_images
from fingerprint_lm.distributor.issue_screens import choose_screen
from fingerprint_lm.errors import ConfigError, RegistryError
from fingerprint_lm.methods import CarrierMethod, PNMMethod, personal_tensors
from fingerprint_lm.models.act import ACT_TYPES
from fingerprint_lm.models.checkpoint import load_fingerprint_model
from fingerprint_lm.models.extractor import build_extractor
from fingerprint_lm.models.pooled_extractor import BandEnergyExtractor, PooledExtractor
from fingerprint_lm.models.vae import build_vae
from fingerprint_lm.report.tables import summary_csv, summary_markdown
from fingerprint_lm.tasks import run
from fingerprint_lm.tasks.train import method_from_config
from tests.conftest import ROOT, compose_config
from tests.console import run_console

BITS = 32


@pytest.fixture(scope="module")
def tiny_default_cfg(tmp_path_factory):
    """``debug=tiny``'s composed config, read-only, for this module's tests that only read it (the
    suite's one shared composition is conftest's ``default_cfg``)."""
    cfg = compose_config(tmp_path_factory.mktemp("tiny_default_cfg"), [])
    OmegaConf.set_readonly(cfg, True)
    return cfg


# The stock-weight methods, and pnm with per-user kernels (spatial structure) at two conv sites.
STOCK_METHODS = {
    "pnm": ["method=pnm"],
    "wouaf": ["method=wouaf"],
    "pnm_kernels": ["method=pnm", "+method.pnm.kernel_sites=[conv_out,up_blocks.*.resnets.0.conv1]"],
}


@pytest.fixture(scope="module", params=list(STOCK_METHODS))
def pnm_model(tmp_path_factory, request):
    """An untrained stock-weight model (method=pnm: GroupNorm affines, conv input channels, and
    optionally kernels; method=wouaf: conv input channels) on the debug=tiny VAE, its heads set to
    random values so that every user's copy differs from the base decoder (about 0.1 relative
    change per value)."""
    cfg = compose_config(tmp_path_factory.mktemp(request.param), STOCK_METHODS[request.param])
    method = method_from_config(cfg)
    torch.manual_seed(0)
    model = method.build_model(build_vae(OmegaConf.to_container(cfg.model.vae_config)).eval(), BITS)
    heads = [*model.pnm.affine_heads.values(), *model.pnm.conv_heads.values(), *model.pnm.kernel_heads.values()]
    assert heads and model.method == request.param.split("_")[0]
    assert bool(model.pnm.kernel_site_names) == request.param.endswith("kernels")
    with torch.no_grad():
        for head in heads:
            head.weight.normal_(0, 0.05)
    return model


def set_eps(module, eps: float) -> None:
    for norm in module.modules():
        if isinstance(norm, torch.nn.GroupNorm):
            norm.eps = eps


def test_method_group_instantiates_every_method(tmp_path, tiny_default_cfg):
    pnm = method_from_config(tiny_default_cfg)  # the default
    carrier = method_from_config(compose_config(tmp_path, ["method=carrier"]))
    wouaf = method_from_config(compose_config(tmp_path, ["method=wouaf"]))
    assert isinstance(carrier, CarrierMethod) and isinstance(pnm, PNMMethod)
    assert wouaf.record()["method"] == "wouaf" and wouaf.pnm["affine_sites"] == [] and wouaf.pnm["conv_sites"]
    assert pnm.pnm["spatial_site"] is None and pnm.extractor["kind"] == "band_energy"
    assert pnm.record()["method"] == "pnm"
    # the learned reader is one setting away; its own settings, not the band reader's, are used
    pooled = method_from_config(compose_config(tmp_path, ["method=pnm", "method.extractor.kind=pooled",
                                                             "method.content_reader=null"]))
    vae = build_vae(OmegaConf.to_container(tiny_default_cfg.model.vae_config))
    assert isinstance(pooled.build_model(vae, 16).extractor, PooledExtractor)
    with pytest.raises(ConfigError, match="method.extractor.pooled"):
        build_extractor(16, kind="pooled", pooled={"filter_size": 7})


@pytest.mark.parametrize("act_type", ACT_TYPES)
def test_stock_copy_is_a_stock_folder_equal_to_the_methods_decoder(pnm_model, tmp_path, act_type):
    """Exactly the two stock files; AutoencoderKL.from_pretrained decodes within 1e-5 of the
    distributor's PNM decoder. ACT none/permute/sign are exact at the stock GroupNorm eps; ACT
    scale changes a group's input scale s, which GroupNorm cancels exactly only at eps = 0
    (it divides by sqrt(var + eps / s^2)): those are compared at eps 0, and bounded at stock eps."""
    code = torch.randint(0, 2, (BITS,), generator=torch.Generator().manual_seed(1))
    state, bias_map, _ = personal_tensors(pnm_model, code.numpy(), act_type, act_seed=7)
    assert bias_map is None
    folder = tmp_path / "copy"
    write_copy(folder, pnm_model.vae.config, state)
    assert sorted(p.name for p in folder.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])

    latents = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    stock = AutoencoderKL.from_pretrained(folder).eval()
    with torch.no_grad():
        reference = pnm_model.pnm(latents, code[None])
        base = pnm_model.pnm(latents, None)
        assert (reference - base).abs().max() > 1e-2  # the code changes the decoder
        diff = (stock.decode(latents).sample - reference).abs().max().item()
        if act_type in ("none", "permute", "sign"):
            assert diff <= 1e-5, diff
        else:
            assert diff <= 1e-3, diff
            set_eps(stock, 0.0)
            set_eps(pnm_model.pnm, 0.0)
            try:
                exact = (stock.decode(latents).sample - pnm_model.pnm(latents, code[None])).abs().max().item()
            finally:
                set_eps(pnm_model.pnm, 1e-6)
            assert exact <= 1e-5, exact
        # load_copy is a stock load for such a copy
        assert torch.equal(load_copy(folder).decode(latents).sample,
                           AutoencoderKL.from_pretrained(folder).decode(latents).sample)


def test_band_energy_extractor_reads_a_band_texture_after_shifts_and_crops():
    """A faint plane wave in bit i's secret band (amplitude 0.05 on smooth random images whose
    pixel spread is ~0.25) raises logit i above the same image's unmarked logit wherever it is
    read: unshifted, shifted by 1 or 8 px (crop without resize) and from a 50% crop; unmarked
    images stay balanced around 0.
    A circular roll is not the test here: the wrap seam is a sharp edge, energy in every band."""
    generator = torch.Generator().manual_seed(0)
    size, n = 40, 128

    def fields(count):
        smooth = torch.nn.functional.interpolate(torch.rand(count, 3, 10, 10, generator=generator), size=size,
                                                 mode="bilinear")
        return smooth + 0.01 * torch.randn(count, 3, size, size, generator=generator)

    reader = BandEnergyExtractor(48)
    reader.fit_whitening(fields(512)[..., :32, :32])
    clean = fields(n)
    yy, xx = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    for bit in (0, 17, 41):
        f, a = reader.band_frequency[bit], reader.band_angle[bit]
        phase = torch.rand(n, 1, 1, generator=generator) * 6.3
        wave = torch.cos(2 * torch.pi * f * (torch.cos(a) * xx + torch.sin(a) * yy) + phase)
        marked = clean + 0.05 * wave[:, None] * reader.band_colour[bit][None, :, None, None]
        for window in ((0, 32), (1, 32), (8, 32), (4, 23)):  # (offset, side): 23^2 / 32^2 = 0.52
            start, side = window
            crop = (slice(None), slice(None), slice(start, start + side), slice(start, start + side))
            raised = reader(marked[crop])[:, bit] > reader(clean[crop])[:, bit]
            assert raised.float().mean() >= 0.95, (bit, window)
        ones = (reader(clean[..., :32, :32])[:, bit] > 0).float().mean()
        assert 0.3 <= ones <= 0.7, (bit, ones)
    with pytest.raises(Exception, match="at least 7 px"):
        reader(torch.rand(1, 3, 6, 6))


def test_bad_method_values_are_one_error_line(tmp_path, tiny_default_cfg):
    with pytest.raises(ConfigError, match="spatial_site must be null"):
        method_from_config(compose_config(tmp_path, ["method=pnm", "method.pnm.spatial_site=conv_norm_out"]))
    with pytest.raises(ConfigError, match="shift-invariant extractor"):
        method_from_config(compose_config(tmp_path, ["method=pnm", "method.extractor.kind=tiled"]))
    with pytest.raises(ConfigError, match="unknown extractor kind 'nope'"):
        method_from_config(compose_config(tmp_path, ["method=pnm", "method.extractor.kind=nope"]))
    with pytest.raises(ConfigError, match="tiled extractor"):
        method_from_config(compose_config(tmp_path, ["method=carrier", "+method.extractor.kind=pooled"]))
    with pytest.raises(ConfigError, match="^method: "):  # Hydra's multi-line message, as one line
        method_from_config(compose_config(tmp_path, ["method=pnm", "+method.nope=1"]))
    # whitening needs more images than bits: refused when the model is built, before training
    small = method_from_config(compose_config(tmp_path, ["method=pnm", "method.detector_fit_samples=16"]))
    with pytest.raises(ConfigError, match="detector_fit_samples > 48"):
        small.build_model(build_vae(OmegaConf.to_container(tiny_default_cfg.model.vae_config)), 48)
    result = run_console(["debug=tiny", "method=pnm", "method.steps=0", f"hydra.run.dir={tmp_path / 'run'}"],
                         cwd=tmp_path, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == ["error: method.steps must be a positive integer, got 0"], result.stderr


def test_sweep_summary_puts_methods_side_by_side():
    def row(method, attack, bit_acc, colluders=1, act="all", strength=None):
        case = attack if colluders == 1 else f"{attack}_c{colluders}"
        return {"method": method, "fingerprint_bits": 48, "act": act, "attack": attack, "colluders": colluders,
                "attack_strength": strength, "case": case, "bit_acc": bit_acc, "psnr": 30.5}

    rows = [row("carrier", "none", 0.999), row("pnm", "none", 0.6), row("carrier", "shift", 0.41, strength=1.0),
            row("pnm", "shift", 0.59, strength=1.0), row("pnm", "average", 0.5, colluders=2)]
    text = summary_markdown(rows)
    table = text[text.index("## Methods side by side"):].splitlines()
    assert table[2] == "| case | carrier 48-bit | pnm 48-bit |"
    assert "| none | 0.999 (30.5) | 0.600 (30.5) |" in table
    assert "| shift | 0.410 (30.5) | 0.590 (30.5) |" in table
    assert "## carrier: 48-bit fingerprints" in text and "## pnm: 48-bit fingerprints" in text
    # the opening table: a row per method; the worst image attack is named
    compared = text[text.index("## Methods compared"):text.index("## Methods side by side")].splitlines()
    assert compared[4].startswith("| carrier 48-bit | 0.999 | 30.50 | 0.410 / 0.410 (shift) |")
    assert compared[5].startswith("| pnm 48-bit | 0.600 | 30.50 | 0.590 / 0.590 (shift) |")
    assert summary_csv(rows).splitlines()[1].startswith("carrier,48,all,none")
    # one method: no side-by-side section, headings as before
    assert "Methods side by side" not in summary_markdown([r for r in rows if r["method"] == "pnm"])


def test_short_pnm_training_reads_above_chance_through_a_stock_loaded_copy(tmp_path):
    """A debug=tiny training (16 px, 2-level VAE) with 400 steps at a 20 dB target: a copy issued
    from it, loaded with AutoencoderKL.from_pretrained, marks fresh images that the extractor
    reads clearly above chance (256 images x 16 bits: chance is 0.5 +- 0.008). The worst-case
    term is off (wc_steps=0: half of each step's cost; the other pnm trainings here keep it).
    Measured on 2026-12-07 for three codes: band reader 0.82-0.94 (this code: 0.82), content
    reader 0.81-0.91 (0.81); with the worst-case term 0.90-0.94 on 2026-12-06."""
    metrics = run(compose_config(tmp_path, ["method=pnm", "fingerprint_bits=16", "method.steps=400",
                                            "method.train.psnr_target=20", "method.train.wc_steps=0",
                                            "method.issue_screen={keep: 0.5, min_psnr: 15, candidates: 8, "
                                            "rate_candidates: 16}", "eval.issue_predictor_codes=40",
                                            "method.content_reader={unmarked_images: 256, train_images: 512, "
                                            "steps: 300, calibration_images: 256, seed: 1, attack_weight: 0.25}"]))
    model = load_fingerprint_model(metrics["checkpoint"])
    assert model.method == "pnm"
    # ... and by fitting the floors task=issue screens codes with (debug=tiny leaves them out; set here)
    screen = model.meta["issue_screen"]
    assert screen == metrics["issue_screen"] and screen["candidates"] == 8 and screen["min_probe_psnr"] == 15
    assert 0.6 < screen["min_probe_bit_acc"] < 1 and screen["pass_rate_codes"] == 16
    assert screen["pass_rate"] > 0  # measured on 16 other codes: some of them clear a floor at the fit codes' median
    # ... and the read predictor after the floors (eval.issue_predictor_codes), which task=issue then screens with
    assert screen["predictor"]["fit_codes"] == 40 and screen["predictor"]["min_predicted_psnr"] == 15
    assert set(model.issue_predictor) == {"weight", "offset"} and choose_screen(model) == "predicted"
    # training ends by calibrating the reader per bit (method.bit_calibration_images), and the checkpoint records it
    assert not torch.all(model.extractor.bit_scale == 1)
    assert model.meta["bit_calibration"]["bit_slope_max"] == metrics["bit_slope_max"]
    code = torch.randint(0, 2, (16,), generator=torch.Generator().manual_seed(5))
    state, _, _ = personal_tensors(model, code.numpy(), "all", act_seed=3)
    write_copy(tmp_path / "copy", model.vae.config, state)
    stock = AutoencoderKL.from_pretrained(tmp_path / "copy").eval()
    images = held_out_images(16, 256, seed=77)
    with torch.no_grad():
        bit_acc = ((model.extractor(decode_with(model.vae, stock, images)) > 0).long() == code).float().mean().item()
    assert bit_acc >= 0.6, bit_acc
    # ... and by fitting the distributor's content reader (debug=tiny leaves it out; set here), which reads them too
    assert model.reader is model.content_reader and model.meta["content_reader"] == metrics["content_reader"]
    with torch.no_grad():
        content = ((model.reader(decode_with(model.vae, stock, images)) > 0).long() == code).float().mean().item()
    assert content >= 0.6, content


def test_a_registry_refuses_another_methods_users(tmp_path, monkeypatch):
    """task=issue with method=pnm records the method in a new registry; a carrier task on it is
    refused (its extractor reads nothing of pnm copies) instead of silently accusing nobody."""
    monkeypatch.setenv("FINGERPRINT_LM_SECRET", "test-secret")
    issued = run(compose_config(tmp_path, ["task=issue", "user_id=bob", "method=pnm"]))
    assert sorted(p.name for p in (tmp_path / "copies" / "bob").iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]
    assert issued["has_bias_map"] is False
    with pytest.raises(RegistryError, match="holds method=pnm users, not method=carrier"):
        run(compose_config(tmp_path, ["task=issue", "user_id=carol", "method=carrier"]))
    assert not (tmp_path / "copies" / "carol").exists()
