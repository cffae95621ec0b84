"""pnm's content-dividing reader (models/content_reader.py, methods/content_reader.py): what it reads
before and after its fit, that its readout keeps unmarked logits white, and that a checkpoint keeps
it without a second copy of its base VAE."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from fingerprint_lm.errors import ConfigError, DataError
from fingerprint_lm.methods.content_reader import (
    _attacked_reads,
    _segments,
    check_content_reader_settings,
    fit_content_reader,
    fit_settings,
)
from fingerprint_lm.models import batched
from fingerprint_lm.models.checkpoint import (
    build_fingerprint_model,
    load_fingerprint_model,
    save_fingerprint_model,
    shipped_checkpoint,
)
from fingerprint_lm.models.content_reader import (
    ContentRatioReader,
    band_colour_covariance,
    band_statistics,
    content_reader_from,
    fit_readout,
)
from fingerprint_lm.models.extractor import soft_null
from fingerprint_lm.models.pooled_extractor import band_log_energy
from fingerprint_lm.models.vae import build_vae
from fingerprint_lm.tasks.compose import method_config
from tests.test_pooled_extractor import images

TINY_VAE = {"block_out_channels": [8, 16], "down_block_types": ["DownEncoderBlock2D"] * 2,
            "up_block_types": ["UpDecoderBlock2D"] * 2, "norm_num_groups": 4}


@pytest.fixture(scope="module")
def tiny_model():
    """An untrained stock-weight model on a 2-level VAE: 8-bit codes, a band reader."""
    torch.manual_seed(0)
    vae = build_vae(TINY_VAE).eval()
    extractor = {"kind": "band_energy", "band_energy": {"seed": 5}}
    return build_fingerprint_model(vae, 8, {"spatial_site": None, "mapping_hidden": 16,
                                            "affine_sites": ["up_blocks.*.resnets.*.norm1"]}, extractor,
                                   {"method": "pnm"})


def test_an_unfitted_content_reader_reads_what_the_band_reader_reads_raw(tiny_model):
    band = tiny_model.extractor
    reader = content_reader_from(band, tiny_model.vae)
    x = images(6)
    with torch.no_grad():
        assert torch.allclose(reader.raw_logits(x), band.raw_logits(x), atol=1e-6)
        reads = reader.reads(x)
        # the second half is the ratio to the image as the base VAE re-makes it: not the image's own energies
        remade = band.raw_logits(reader.remade(x))
        assert torch.allclose(reads[:, 8:], reads[:, :8] - remade, atol=1e-5)
        assert (reads[:, 8:] - reads[:, :8]).abs().max() > 0.1


def test_the_readout_learns_bits_carried_by_the_ratio_and_keeps_unmarked_logits_white():
    """Reads whose image half is content noise and whose ratio half carries each bit as a +-0.5
    shift (plus its own noise): the orthonormal readout finds the bits, and the unmarked reads it
    maps stay white (zero median, identity covariance after the reader's own whitening)."""
    k, generator = 8, torch.Generator().manual_seed(0)
    reader = ContentRatioReader(k)

    def draw(n, codes=None):
        content = 2.0 * torch.randn(n, k, generator=generator)
        ratio = 0.3 * content + torch.randn(n, k, generator=generator)
        if codes is not None:
            ratio = ratio + (codes.float() - 0.5) * 1.5
        return torch.cat([content, ratio], 1)

    codes = torch.randint(0, 2, (4096, k), generator=generator)
    train_acc = fit_readout(reader, draw(4096), draw(4096, codes), codes, steps=300)
    assert train_acc > 0.75, train_acc
    held_codes = torch.randint(0, 2, (2048, k), generator=generator)
    logits = reader.logits_from_reads(draw(2048, held_codes))
    assert ((logits > 0).long() == held_codes).float().mean() > 0.75
    unmarked = reader.logits_from_reads(draw(8192)) / reader.gain
    assert unmarked.median(0).values.abs().max() < 0.06
    covariance = torch.from_numpy(np.cov(unmarked.T.double().numpy()))
    assert torch.allclose(covariance, torch.eye(k, dtype=torch.float64), atol=0.1), covariance
    assert soft_null(reader) is not None  # attribution's soft null holds for it as for the band reader


def test_the_readout_weighs_each_marked_read_by_its_weight():
    """Half the marked reads carry the opposite codes: weighted 0 they teach nothing and the readout
    learns the bits from the other half; weighted like the rest they cancel it to chance."""
    k, generator = 8, torch.Generator().manual_seed(1)

    def draw(n, codes=None):
        reads = torch.randn(n, 2 * k, generator=generator)
        return reads if codes is None else reads + torch.cat([torch.zeros(n, k), (codes.float() - 0.5) * 2], 1)

    codes = torch.randint(0, 2, (2048, k), generator=generator)
    marked = torch.cat([draw(2048, codes), draw(2048, 1 - codes)])
    held_codes = torch.randint(0, 2, (1024, k), generator=generator)
    held = draw(1024, held_codes)
    accuracy = {}
    for name, weights in {"ignored": torch.cat([torch.ones(2048), torch.zeros(2048)]),
                          "equal": torch.ones(4096)}.items():
        reader = ContentRatioReader(k)
        fit_readout(reader, draw(2048), marked, torch.cat([codes, codes]), steps=200, weights=weights)
        accuracy[name] = float(((reader.logits_from_reads(held) > 0).long() == held_codes).float().mean())
    assert accuracy["ignored"] > 0.75 and abs(accuracy["equal"] - 0.5) < 0.1, accuracy


def test_each_training_image_gets_the_next_attack_in_turn_whatever_the_batch():
    """The i-th training image is read under the (i mod n)-th attack, the stream's running index
    carried across batches: a batch smaller than the suite still reaches every attack in turn, and
    the reads come back in the images' order."""
    class Reader:  # reads an image's first two pixel values
        fingerprint_bits, read_width, band_weight = 1, 2, torch.zeros(1)

        def reads(self, images):
            return images.flatten(1)[:, :2]

    attacks = [lambda images, generator, v=v: torch.full_like(images, v / 10) for v in range(3)]
    found = torch.zeros(5, 3, 4, 4)
    out = _attacked_reads(Reader(), found, attacks, 4, torch.Generator())
    # images 4..8 of the stream: attacks 1, 2, 0, 1, 2
    assert torch.allclose(out[:, 0], torch.tensor([0.1, 0.2, 0.0, 0.1, 0.2]), atol=0.01), out


def test_a_content_reader_without_its_base_vae_or_with_bad_reads_is_refused(tiny_model):
    reader = ContentRatioReader(8)
    with pytest.raises(ConfigError, match="no base VAE attached"):
        reader(images(2))
    with pytest.raises(DataError, match="at least 7 px"):
        content_reader_from(tiny_model.extractor, tiny_model.vae)(torch.zeros(1, 3, 6, 6))
    with torch.no_grad():  # ... and reads any image the band reader reads, whatever the VAE's downscale factor
        assert content_reader_from(tiny_model.extractor, tiny_model.vae)(images(2, 11)).shape == (2, 8)
    with pytest.raises(DataError, match=r"\[n, 16\] reads"):
        fit_readout(reader, torch.zeros(40, 8), torch.zeros(40, 8), torch.zeros(40, 8))
    with pytest.raises(DataError, match=r"\[40\] weights >= 0, not all 0"):
        fit_readout(ContentRatioReader(4), torch.randn(40, 8), torch.randn(40, 8), torch.zeros(40, 4, dtype=torch.long),
                    weights=torch.zeros(40))
    with pytest.raises(ConfigError, match="band-energy reader's filters"):
        content_reader_from(torch.nn.Linear(2, 2), tiny_model.vae)


def test_the_fit_takes_consecutive_disjoint_runs_of_the_stream_and_says_when_it_runs_out():
    stream = [torch.arange(5), torch.arange(5, 12)]
    runs = [(name, part.tolist()) for name, part in _segments(stream, {"a": 3, "b": 6, "c": 2})]
    assert runs == [("a", [0, 1, 2]), ("b", [3, 4]), ("b", [5, 6, 7, 8]), ("c", [9, 10])]
    with pytest.raises(DataError, match="ran out of training images"):
        list(_segments(stream, {"a": 10, "b": 5}))


def test_covariance_reads_hold_the_band_energy_and_follow_each_channel():
    """The covariance statistics: row 0 is the band reader's log energy; scaling one colour channel by
    2 adds log 4 to that channel's log variance, nothing to the others', and leaves every correlation."""
    weight = torch.randn(16, 3, 5, 5, generator=torch.Generator().manual_seed(2))
    x = images(3, 20)
    stats = band_colour_covariance(x, weight)
    assert stats.shape == (3, 7, 8)
    assert torch.allclose(stats[:, 0], band_log_energy(x, weight), atol=1e-4)
    scaled = band_colour_covariance(x * torch.tensor([2.0, 1.0, 1.0])[:, None, None], weight)
    assert torch.allclose(scaled[:, 1] - stats[:, 1], torch.full_like(stats[:, 1], np.log(4.0)), atol=1e-4)
    assert torch.allclose(scaled[:, 2:], stats[:, 2:], atol=1e-4)
    assert not torch.allclose(scaled[:, 0], stats[:, 0], atol=1e-2)  # the summed energy moves with the channel
    assert band_statistics(x, weight, "covariance").shape == (3, 56)


def test_content_reader_statistics_are_checked_and_a_cycle_reads_its_own():
    settings = {"train_images": 200, "unmarked_images": 200, "statistics": "covariance", "cycle_statistics": "energy"}
    assert check_content_reader_settings(settings, 8) == settings
    assert fit_settings(settings) == {"train_images": 200, "unmarked_images": 200, "statistics": "covariance"}
    assert fit_settings(settings, for_cycle=True)["statistics"] == "energy"
    assert fit_settings({"steps": 5}) == {"steps": 5, "statistics": "energy"}  # unset: the energies
    with pytest.raises(ConfigError, match="statistics must be one of energy, covariance"):
        check_content_reader_settings({"statistics": "kurtosis"})
    # whitening 2 x 7 x 8 = 112 covariance reads needs more than 112 images of each kind
    with pytest.raises(ConfigError, match="unmarked_images must exceed the 112 numbers"):
        check_content_reader_settings({**settings, "unmarked_images": 100}, 8)
    assert check_content_reader_settings({"unmarked_images": 100}, 8)  # 16 energy reads
    with pytest.raises(ConfigError, match="statistics are one of"):
        ContentRatioReader(8, statistics="phase")


@pytest.mark.parametrize("statistics, sizes", [("energy", (80, 40, 40)), ("covariance", (160, 160, 40))])
def test_a_fitted_content_reader_round_trips_through_a_checkpoint_without_its_vae(tiny_model, tmp_path,
                                                                                  statistics, sizes):
    model = build_fingerprint_model(tiny_model.vae, 8, {"spatial_site": None, "mapping_hidden": 16,
                                                        "affine_sites": ["up_blocks.*.resnets.*.norm1"]},
                                    {"kind": "band_energy", "band_energy": {"seed": 5}}, {"method": "pnm"})
    model.meta.update({"fingerprint_bits": 8, "pnm": {"spatial_site": None, "mapping_hidden": 16,
                                                      "affine_sites": ["up_blocks.*.resnets.*.norm1"]},
                       "extractor": {"kind": "band_energy", "band_energy": {"seed": 5}}})
    torch.manual_seed(1)
    train, unmarked, calibration = sizes
    figures = fit_content_reader(model, images(400, 16, seed=9).split(64), train_images=train,
                                 unmarked_images=unmarked, calibration_images=calibration, steps=20, seed=3,
                                 attack_weight=0.5, statistics=statistics)
    assert model.content_reader.statistics == statistics
    assert model.content_reader.read_width == 2 * 8 * {"energy": 1, "covariance": 7}[statistics]
    # the readout trained on the training images clean and under the robustness suite's attacks too
    assert set(figures) >= {"readout_bit_acc", "attacked_readout_bit_acc", "calibration_bit_acc", "bit_slope_median"}
    assert model.reader is model.content_reader and model.content_reader.reference is model.unmarked_vae
    save_fingerprint_model(model, tmp_path / "ckpt")
    keys = set(load_file(tmp_path / "ckpt" / "fingerprint.safetensors"))
    assert "content_reader.readout" in keys and not any(k.startswith("content_reader.reference.") for k in keys)
    loaded = load_fingerprint_model(tmp_path / "ckpt")
    x = images(4)
    with torch.no_grad():
        assert torch.allclose(loaded.reader(x), model.reader(x), atol=1e-5)
        assert not torch.allclose(loaded.reader(x), loaded.extractor(x), atol=1e-2)
    assert loaded.content_reader.statistics == statistics  # told by how many reads it whitens


def test_a_vae_held_in_bfloat16_is_fed_its_own_dtype(tiny_model):
    """model.dtype=bfloat16 holds the VAE in bfloat16; images and latents arrive as float32. The
    batched helpers and the content reader's fit (which decodes the unmarked images with the base
    VAE) cast them to the VAE's dtype and hand float32 back: a float32 input once stopped the fit,
    the last step of a training run, with a dtype error."""
    vae = copy.deepcopy(tiny_model.vae).to(torch.bfloat16)
    x = images(4)
    latents = batched.encode(vae, x)
    assert latents.dtype == torch.float32 and batched.decode(vae, latents).dtype == torch.float32
    spec = {"spatial_site": None, "mapping_hidden": 16, "affine_sites": ["up_blocks.*.resnets.*.norm1"]}
    extractor = {"kind": "band_energy", "band_energy": {"seed": 5}}
    model = build_fingerprint_model(vae, 8, spec, extractor, {"method": "pnm"})
    model.meta.update({"fingerprint_bits": 8, "pnm": spec, "extractor": extractor})
    figures = fit_content_reader(model, images(200, 16, seed=9).split(64), train_images=80, unmarked_images=40,
                                 calibration_images=40, steps=5, seed=3, attack_weight=0.5)
    assert abs(figures["calibration_bit_acc"] - 0.5) < 0.15  # read, not crashed: an untrained mark reads at chance


def test_the_shipped_pnm_checkpoint_reads_with_its_content_reader():
    """Fitted by experiments/fit_content_reader.py, recorded in the checkpoint and in its recipe (so
    the collusion sweep still takes it for conf/method/pnm.yaml's)."""
    model = load_fingerprint_model(shipped_checkpoint("embedded_pnm"))
    assert model.content_reader is not None and model.reader is model.content_reader
    assert model.content_reader.reference is model.reference_vae
    # the settings it was fitted with are pnm.yaml's own (16384 marked images since 2026-12-07 night)
    assert model.meta["recipe"]["content_reader"] == OmegaConf.to_container(method_config("pnm").content_reader)
    assert model.meta["content_reader"]["calibration_bit_acc"] > 0.9
    # the colour covariance reads, refitted 2026-12-07 evening (experiments/results/colour_covariance_reader.md)
    assert model.content_reader.statistics == model.meta["recipe"]["content_reader"]["statistics"] == "covariance"


def test_a_repeated_read_is_remembered_until_the_reader_or_the_images_change(tiny_model):
    """The sweep reads the same base-decoder outputs at every point of a model; batched.extract_repeated
    remembers them, keyed on every tensor of the reader (its base VAE's too) and on the images."""
    reader = content_reader_from(tiny_model.extractor, build_vae(TINY_VAE).eval())
    reader.readout.copy_(torch.cat([torch.eye(8), torch.eye(8)], 1) / 2**0.5)  # reads the ratio too
    x = images(5)
    first = batched.extract_repeated(reader, x)
    assert torch.equal(first, batched.extract(reader, x))
    calls = []
    reader.register_forward_hook(lambda *args: calls.append(1))
    assert torch.equal(batched.extract_repeated(reader, x), first) and not calls  # remembered
    with torch.no_grad():
        reader.reference.decoder.conv_out.bias.add_(0.1)  # the attached VAE changed: read anew
    changed = batched.extract_repeated(reader, x)
    assert calls and not torch.equal(changed, first)
    assert not torch.equal(batched.extract_repeated(reader, x.flip(-1)), changed)
