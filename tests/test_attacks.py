"""Image attacks and model-level attacks: shape, range, identity, strength, purity (collusion
merges: tests/test_merges.py)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from fingerprint_lm.attacks.cases import parse_case
from fingerprint_lm.attacks.image import (
    DEFAULT_STRENGTHS,
    IDENTITY_STRENGTH,
    IMAGE_ATTACKS,
    SIZE_CHANGING,
    get_image_attack,
    regenerate,
)
from fingerprint_lm.attacks.model import (
    estimate_and_remove,
    finetune_reconstruction,
    magnitude_prune,
    quantize_roundtrip,
    spectral_equalize,
    swap_in_base,
    weight_noise,
    zero_mark_parameters,
)
from fingerprint_lm.data.synthetic import ProceduralImages
from fingerprint_lm.errors import ConfigError, DataError
from fingerprint_lm.models.vae import build_vae
from tests.state_dicts import SMALL_VAE_CONFIG, assert_same_state, clone, random_affine_state_dict

# (weaker, stronger) strength of every image attack with a strength.
STRENGTH_PAIRS = {
    "jpeg": (90, 10),
    "crop_resize": (0.9, 0.25),
    "resize": (0.75, 0.25),
    "rotation": (10, 45),
    "gaussian_blur": (0.5, 2.0),
    "gaussian_noise": (0.05, 0.2),
    "brightness": (1.2, 2.0),
    "contrast": (1.2, 2.0),
    "saturation": (1.2, 2.0),
}



def procedural(count: int, resolution: int = 32, seed: int = 3) -> torch.Tensor:
    data = ProceduralImages(resolution=resolution, seed=seed, length=count)
    return torch.stack([data.sample(i)["image"] for i in range(count)])


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return procedural(8)


@pytest.fixture(scope="module")
def small_vae() -> nn.Module:
    torch.manual_seed(0)
    return build_vae(SMALL_VAE_CONFIG).eval()


# -- image attacks ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "strength"), [(name, s) for name in IMAGE_ATTACKS for s in DEFAULT_STRENGTHS[name]]
)
def test_image_attack_shape_range_purity(images, name, strength):
    before = images.clone()
    out = IMAGE_ATTACKS[name](images, strength, torch.Generator().manual_seed(0))
    if name in SIZE_CHANGING:  # a cut without resize: smaller, never larger
        assert out.shape[:2] == images.shape[:2] and out.shape[-2:] < images.shape[-2:]
    else:
        assert out.shape == images.shape
        assert not torch.equal(out, images)  # every default grid point is an actual attack
    assert out.dtype == images.dtype
    assert out.min() >= -1 and out.max() <= 1
    assert torch.isfinite(out).all()
    assert torch.equal(images, before)


@pytest.mark.parametrize("name", [n for n in IDENTITY_STRENGTH if n in IMAGE_ATTACKS])
def test_image_attack_identity_strength(images, name):
    out = IMAGE_ATTACKS[name](images, IDENTITY_STRENGTH[name], torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, images, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", list(STRENGTH_PAIRS))
def test_stronger_attack_changes_more(images, name):
    weak, strong = STRENGTH_PAIRS[name]
    attack = IMAGE_ATTACKS[name]
    change = [
        (attack(images, s, torch.Generator().manual_seed(0)) - images).abs().mean().item()
        for s in (weak, strong)
    ]
    assert 0 < change[0] < change[1]


@pytest.mark.parametrize("name", ["crop", "crop_resize", "gaussian_noise", "combined"])
def test_random_attacks_deterministic_given_generator(images, name):
    attack = IMAGE_ATTACKS[name]
    strength = DEFAULT_STRENGTHS[name][-1]
    first = attack(images, strength, torch.Generator().manual_seed(7))
    again = attack(images, strength, torch.Generator().manual_seed(7))
    other = attack(images, strength, torch.Generator().manual_seed(8))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_jpeg_is_real_8bit_jpeg(images):
    out = IMAGE_ATTACKS["jpeg"](images, 50)
    levels = (out + 1) * 127.5
    torch.testing.assert_close(levels, levels.round(), atol=1e-4, rtol=0)  # decoded from 8-bit pixels
    assert torch.equal(out, IMAGE_ATTACKS["jpeg"](images, 50))
    with pytest.raises(ConfigError):
        IMAGE_ATTACKS["jpeg"](images, 0)


def test_rotation_by_90_degrees_is_rot90(images):
    # On a square grid (align_corners=False) a quarter turn maps pixel centres onto pixel centres.
    out = IMAGE_ATTACKS["rotation"](images, 90)
    torch.testing.assert_close(out, torch.rot90(images, k=1, dims=(2, 3)), atol=1e-5, rtol=0)


def test_rotation_fills_corners_from_the_border():
    flat = torch.full((1, 3, 16, 16), 0.5)
    torch.testing.assert_close(IMAGE_ATTACKS["rotation"](flat, 30), flat, atol=1e-6, rtol=0)


def test_noise_std_is_in_unit_scale():
    grey = torch.zeros(4, 3, 32, 32)
    out = IMAGE_ATTACKS["gaussian_noise"](grey, 0.05, torch.Generator().manual_seed(0))
    assert abs(out.std().item() - 0.1) < 0.005  # 0.05 on [0, 1] is 0.1 on [-1, 1]


def test_blur_keeps_constant_images_and_smooths_edges(images):
    flat = torch.full((2, 3, 16, 16), 0.3)
    torch.testing.assert_close(IMAGE_ATTACKS["gaussian_blur"](flat, 2.0), flat, atol=1e-6, rtol=0)
    blurred = IMAGE_ATTACKS["gaussian_blur"](images, 2.0)
    assert blurred.diff(dim=-1).abs().mean() < 0.5 * images.diff(dim=-1).abs().mean()


def test_colour_attacks_at_zero(images):
    grey = IMAGE_ATTACKS["saturation"](images, 0.0)
    assert torch.allclose(grey[:, 0], grey[:, 1], atol=1e-6) and torch.allclose(
        grey[:, 1], grey[:, 2], atol=1e-6
    )
    flat = IMAGE_ATTACKS["contrast"](images, 0.0)
    assert flat.flatten(1).std(dim=1).max() < 1e-6
    black = IMAGE_ATTACKS["brightness"](images, 0.0)
    assert torch.equal(black, torch.full_like(images, -1.0))


def test_crop_and_shift_cut_pixels_without_resizing(images):
    """crop keeps the very pixels of a window (no resampling), crop_resize resamples the same
    window back to full size, shift cuts exactly its offset off the top and the left."""
    window = IMAGE_ATTACKS["crop"](images, 0.25, torch.Generator().manual_seed(5))
    assert window.shape[-2:] == (16, 16)
    found = [
        any(torch.equal(w, image[:, top : top + 16, left : left + 16]) for top in range(17) for left in range(17))
        for w, image in zip(window, images)
    ]
    assert all(found)
    resized = IMAGE_ATTACKS["crop_resize"](images, 0.25, torch.Generator().manual_seed(5))
    torch.testing.assert_close(
        resized, F.interpolate(window, size=(32, 32), mode="bilinear", align_corners=False).clamp(-1, 1)
    )
    shifted = IMAGE_ATTACKS["shift"](images, 3)
    assert torch.equal(shifted, images[..., 3:, 3:])
    for bad in (1.5, -1, 32):
        with pytest.raises(ConfigError, match="shift takes a whole number of pixels"):
            IMAGE_ATTACKS["shift"](images, bad)


def test_mirror_is_a_left_right_flip_and_a_case_without_strength(images):
    out = IMAGE_ATTACKS["mirror"](images, None)
    assert torch.equal(out[..., 0], images[..., -1]) and torch.equal(IMAGE_ATTACKS["mirror"](out, None), images)
    assert parse_case("mirror_c1") == ("mirror", None, 1) and parse_case("mirror") == ("mirror", None, 1)
    with pytest.raises(ConfigError, match="works on one copy"):
        parse_case("mirror_c2")
    with pytest.raises(ConfigError, match="needs a strength"):  # the other image attacks still need one
        parse_case("rotation_c1")


def test_combined_is_crop_brightness_jpeg(images):
    generator = torch.Generator().manual_seed(3)
    out = IMAGE_ATTACKS["combined"](images, None, generator)
    expected = IMAGE_ATTACKS["jpeg"](
        IMAGE_ATTACKS["brightness"](
            IMAGE_ATTACKS["crop_resize"](images, 0.5, torch.Generator().manual_seed(3)), 1.5
        ),
        80,
    )
    assert torch.equal(out, expected)


def test_regeneration(images, small_vae):
    x = images[:4, :, :16, :16]
    out = regenerate(x, small_vae)
    assert out.shape == x.shape and out.min() >= -1 and out.max() <= 1
    assert not torch.equal(out, x)
    attack = get_image_attack("regeneration", small_vae)
    assert torch.equal(attack(x, 1), out)
    assert torch.equal(attack(x, IDENTITY_STRENGTH["regeneration"]), x)
    with pytest.raises(ConfigError):
        get_image_attack("regeneration")
    with pytest.raises(ConfigError):
        get_image_attack("no_such_attack")


# -- model-level attacks --------------------------------------------------------------------


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    return random_affine_state_dict()


def test_weight_noise_relative_std(state):
    before = clone(state)
    noisy = weight_noise(state, 0.05, torch.Generator().manual_seed(0))
    assert_same_state(state, before)  # input untouched
    key = max((k for k in state if state[k].is_floating_point()), key=lambda k: state[k].numel())
    measured = ((noisy[key] - state[key]).std() / state[key].std()).item()
    assert abs(measured - 0.05) < 0.005
    for k in state:  # every float tensor perturbed, relative to its own scale
        assert not torch.equal(noisy[k], state[k]), k
    again = weight_noise(state, 0.05, torch.Generator().manual_seed(0))
    assert_same_state(noisy, again)


def test_magnitude_prune_fraction(state):
    before = clone(state)
    pruned = magnitude_prune(state, 0.3)
    assert_same_state(state, before)
    for key, value in state.items():
        if value.dim() < 2:
            assert torch.equal(pruned[key], value), key
            continue
        zeroed = pruned[key] == 0
        assert zeroed.sum().item() == math.floor(0.3 * value.numel()), key
        kept = ~zeroed
        assert torch.equal(pruned[key][kept], value[kept])
        assert value[kept].abs().min() >= value[zeroed].abs().max()  # the smallest went


def test_int8_roundtrip_error_bounded(state):
    quantized = quantize_roundtrip(state, "int8")
    changed = False
    for key, value in state.items():
        bound = value.abs().max().item() / 254 * (1 + 1e-5)
        error = (quantized[key] - value).abs().max().item()
        assert error <= bound, key
        assert quantized[key].unique().numel() <= 255
        changed |= error > 0
    assert changed


@pytest.mark.parametrize(("mode", "relative"), [("fp16", 2.0**-11), ("bf16", 2.0**-8)])
def test_half_precision_roundtrip(state, mode, relative):
    out = quantize_roundtrip(state, mode)
    for key, value in state.items():
        assert out[key].dtype == value.dtype
        normal = value.abs() > 1e-4  # fp16 subnormals lose relative precision
        error = ((out[key] - value).abs() / value.abs().clamp_min(1e-30))[normal]
        assert error.numel() == 0 or error.max().item() <= relative, key
    assert any(not torch.equal(out[k], state[k]) for k in state)
    with pytest.raises(ConfigError):
        quantize_roundtrip(state, "int4")


def test_finetune_reconstruction_changes_decoder_only(small_vae):
    x = procedural(32, resolution=16, seed=5)
    before = {k: v.clone() for k, v in small_vae.state_dict().items()}

    def reconstruction_error(vae: nn.Module) -> float:
        with torch.no_grad():
            return F.mse_loss(vae.decode(vae.encode(x).latent_dist.mode()).sample, x).item()

    attacked = finetune_reconstruction(
        small_vae, 5, 1e-3, x, batch_size=16, generator=torch.Generator().manual_seed(0)
    )
    assert_same_state(small_vae.state_dict(), before)  # the copy given is untouched
    after = attacked.state_dict()
    assert any(not torch.equal(after[k], before[k]) for k in before if k.startswith("decoder."))
    assert all(torch.equal(after[k], before[k]) for k in before if k.startswith(("encoder.", "quant_conv.")))
    assert reconstruction_error(attacked) < reconstruction_error(small_vae)  # the decoder still works, better


def test_finetune_accepts_a_loader(small_vae):
    x = procedural(8, resolution=16, seed=6)
    loader = [{"image": x[:4]}, {"image": x[4:]}]
    attacked = finetune_reconstruction(small_vae, 3, 1e-3, loader)
    assert any(not torch.equal(attacked.state_dict()[k], v) for k, v in small_vae.state_dict().items())


def test_swap_in_base(state):
    base = random_affine_state_dict(seed=1)
    swapped = swap_in_base(state, base)
    assert_same_state(swapped, base)
    assert all(swapped[k].data_ptr() != base[k].data_ptr() for k in base)
    with pytest.raises(ConfigError):
        swap_in_base(state, {k: v for k, v in base.items() if not k.startswith("decoder.")})


@pytest.mark.parametrize(("period", "max_ratio"), [(8, 0.4), (None, 0.5)])
def test_estimate_and_remove_periodic_mark(period, max_ratio):
    clean = procedural(64, seed=7)
    generator = torch.Generator().manual_seed(0)
    tile = (torch.randint(0, 2, (3, 8, 8), generator=generator) * 2 - 1).float() * 0.06
    marked = (clean + tile.repeat(1, 4, 4)).clamp(-1, 1)
    before = marked.clone()
    cleaned = estimate_and_remove(marked, period=period)
    assert torch.equal(marked, before)
    residual_before = (marked - clean).pow(2).mean().sqrt().item()
    residual_after = (cleaned - clean).pow(2).mean().sqrt().item()
    # measured: 0.060 -> 0.017 (period 8), 0.020 (no period)
    assert residual_after < max_ratio * residual_before
    assert cleaned.min() >= -1 and cleaned.max() <= 1


def band_gain(resolution: int, low: float, high: float, gain: float) -> torch.Tensor:
    """A [H, W] frequency response: ``gain`` where |frequency| (cycles/px) is in [low, high), 1 elsewhere."""
    freq = torch.fft.fftfreq(resolution)
    radius = (freq[:, None] ** 2 + freq[None, :] ** 2).sqrt()
    return torch.where((radius >= low) & (radius < high), gain, 1.0).double()


def test_spectral_equalize_removes_a_band_tilt_and_keeps_unmarked_images():
    """A fixed band-energy change (the kind a per-channel decoder mark makes) is removed exactly:
    the attacker's marked outputs and the same outputs unmarked come out the same. What is left
    is the estimate's own error (reference images of other content), smaller than the mark."""
    clean = procedural(512, seed=7) * 0.5  # inside (-1, 1): the clamp stays out of the way
    reference = procedural(512, seed=8) * 0.5  # the attacker's own images, other content
    tilt = band_gain(32, 0.12, 0.35, 1.4)
    marked = torch.fft.ifft2(torch.fft.fft2(clean.double()) * tilt).real.float()
    before = marked.clone()
    cleaned = spectral_equalize(marked, reference)
    assert torch.equal(marked, before)
    assert torch.allclose(cleaned, spectral_equalize(clean, reference), atol=1e-5)
    mark = (marked - clean).pow(2).mean().sqrt().item()
    # measured: the mark 0.027, left after the attack 0.008 (128 images each: 0.032)
    assert (cleaned - clean).pow(2).mean().sqrt().item() < 0.5 * mark
    halfway = spectral_equalize(marked, reference, strength=0.5)
    assert 0.2 * mark < (halfway - clean).pow(2).mean().sqrt().item() < mark
    assert torch.allclose(spectral_equalize(marked, reference, strength=0.0), marked, atol=1e-6)
    with pytest.raises(DataError):
        spectral_equalize(marked, reference[:, :, :16, :16])
    with pytest.raises(ConfigError):
        spectral_equalize(marked, reference, strength=-1.0)


def test_zero_mark_parameters_with_extra_keys(state):
    copy = {**state, "bias_map": torch.randn(1, 8, 4, 4)}
    before = clone(copy)
    out = zero_mark_parameters(copy, ["bias_map", "decoder.conv_norm_out.*"])
    assert_same_state(copy, before)
    assert torch.count_nonzero(out["bias_map"]) == 0
    assert torch.count_nonzero(out["decoder.conv_norm_out.weight"]) == 0
    assert torch.count_nonzero(out["decoder.conv_norm_out.bias"]) == 0
    untouched = [k for k in copy if k != "bias_map" and not k.startswith("decoder.conv_norm_out.")]
    assert all(torch.equal(out[k], copy[k]) for k in untouched)
    with pytest.raises(ConfigError):
        zero_mark_parameters(copy, ["no.such.parameter"])
