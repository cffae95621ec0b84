"""PNM: identity at zero modulation, per-sample fingerprints, bad fingerprint length."""

import copy

import pytest
import torch

from fingerprint_lm.errors import ConfigError
from fingerprint_lm.lit.fingerprinting import FingerprintModule
from fingerprint_lm.methods.carrier import fit_detector
from fingerprint_lm.models.checkpoint import build_fingerprint_model
from fingerprint_lm.models.extractor import FingerprintExtractor, fold_tiles
from fingerprint_lm.models.pnm import PersonalizedDecoder, hadamard_carriers
from fingerprint_lm.models.vae import build_vae


@pytest.fixture
def vae():
    torch.manual_seed(0)
    return build_vae()


def test_zero_modulation_is_exactly_the_base_decoder(vae):
    reference = copy.deepcopy(vae.decoder)
    pnm = PersonalizedDecoder(vae.decoder, 48)
    with torch.no_grad():
        pnm.carrier_log_amplitude.fill_(-torch.inf)  # carriers off; affine heads start at zero
    latents = torch.randn(3, 4, 8, 8)
    bits = torch.randint(0, 2, (3, 48))
    with torch.no_grad():
        assert torch.equal(reference(latents), pnm(latents, bits))
        assert torch.equal(reference(latents), pnm(latents, None))


def test_parameter_names_of_the_decoder_are_kept(vae):
    names = set(vae.decoder.state_dict())
    pnm = PersonalizedDecoder(vae.decoder, 32)
    assert set(pnm.decoder.state_dict()) == names


def test_fingerprints_change_output_per_sample(vae):
    pnm = PersonalizedDecoder(vae.decoder, 32)
    with torch.no_grad():
        for head in pnm.affine_heads.values():
            head.weight.normal_(0, 0.1)
        latents = torch.randn(1, 4, 8, 8).repeat(2, 1, 1, 1)
        bits = torch.randint(0, 2, (2, 32))
        bits[1] = 1 - bits[0]
        out = pnm(latents, bits)
        solo = pnm(latents[:1], bits[:1])
    assert not torch.allclose(out[0], out[1], atol=1e-4)
    assert torch.allclose(out[:1], solo, atol=1e-5)  # batch members do not leak into each other


def test_wrong_fingerprint_length_is_a_clear_error(vae):
    pnm = PersonalizedDecoder(vae.decoder, 48)
    with pytest.raises(ConfigError, match="48"):
        pnm(torch.randn(1, 4, 8, 8), torch.zeros(1, 32, dtype=torch.long))
    with pytest.raises(ConfigError, match="positive"):
        PersonalizedDecoder(vae.decoder, 0)


def test_unknown_site_is_a_clear_error(vae):
    with pytest.raises(ConfigError, match="spatial"):
        PersonalizedDecoder(vae.decoder, 8, spatial_site="nope")
    with pytest.raises(ConfigError, match="no decoder GroupNorm"):
        PersonalizedDecoder(vae.decoder, 8, affine_sites=["nope.*"])
    with pytest.raises(ConfigError, match="no decoder conv matches the PNM conv sites"):
        PersonalizedDecoder(vae.decoder, 8, conv_sites=["nope.*"])
    with pytest.raises(ConfigError, match="no decoder conv matches the PNM kernel sites"):
        PersonalizedDecoder(vae.decoder, 8, kernel_sites=["nope.*"])
    with pytest.raises(ConfigError, match="kernel_bound must be a finite number > 0"):
        PersonalizedDecoder(vae.decoder, 8, kernel_sites=["conv_out"], kernel_bound=0.0)


def test_carriers_are_orthogonal():
    carriers = hadamard_carriers(48, 16 * 16 * 16, seed=3)
    gram = carriers @ carriers.T
    assert torch.equal(gram, torch.eye(48) * carriers.shape[1])
    assert not torch.equal(carriers, hadamard_carriers(48, 16 * 16 * 16, seed=4))


def test_closed_form_reader_reads_a_fixed_carrier_pattern():
    torch.manual_seed(0)
    k, tile = 16, 8
    carriers = hadamard_carriers(k, 3 * tile * tile, seed=0).view(k, 3, tile, tile)
    bits = torch.randint(0, 2, (2048, k))
    content = torch.randn(2048, 3, 32, 32) * 0.5
    images = content + 0.05 * torch.einsum("bk,kchw->bchw", bits * 2.0 - 1, carriers).repeat(1, 1, 4, 4)
    extractor = FingerprintExtractor(k, tile_size=tile, cnn_channels=())
    extractor.fit_linear_head(images[:1536], bits[:1536])
    acc = ((extractor(images[1536:]) > 0).long() == bits[1536:]).float().mean()
    assert acc > 0.97
    assert fold_tiles(torch.randn(2, 3, 40, 40), 16).shape == (2, 3, 16, 16)


def test_the_carrier_readers_closed_form_fit_runs_on_the_device_its_module_lives_on():
    """Training runs method=carrier's pre-fit hook on the training device; a tensor the fit made on
    the CPU (its ridge term once was) stops it there. The meta device stands in for a GPU: a CPU
    tensor meeting a meta one raises as it would meeting a CUDA one."""
    vae = build_vae()
    module = FingerprintModule(vae, PersonalizedDecoder(vae.decoder, 8), FingerprintExtractor(8)).to("meta")
    fit_detector(module, torch.empty(64, 3, 32, 32, device="meta"))
    assert module.extractor.linear.weight.device.type == "meta"


def test_pnm_decoder_at_zero_modulation_is_vae_decode(vae):
    latents = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        expected = vae.decode(latents).sample
        model = build_fingerprint_model(vae, 16, {}, {"cnn_channels": ()})
        assert torch.equal(model.pnm(latents, None), expected)  # post_quant_conv included
