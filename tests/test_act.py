"""ACT: function preservation per type, determinism, purity, the colluders (naive and adaptive)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fingerprint_lm.errors import ConfigError
from fingerprint_lm.models.act import ACT_TYPES, STREAM_PREFIX, apply_act, derive_act_seed, draw_act, find_act_sites
from fingerprint_lm.models.act_alignment import align_to_reference, aligned_average, average_state_dicts
from fingerprint_lm.models.residual_stream import find_stream_segments
from fingerprint_lm.models.vae import TINY_VAE_CONFIG, build_vae

SMALL_VAE_CONFIG = {
    **TINY_VAE_CONFIG,
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
    "block_out_channels": [8, 16],
    "norm_num_groups": 4,
}
CONFIGS = {"small": SMALL_VAE_CONFIG, "tiny": TINY_VAE_CONFIG}
SITE_SUFFIXES = ("conv1.weight", "conv1.bias", "norm2.weight", "norm2.bias", "conv2.weight")


class Decoder:
    """Decodes fixed random latents with any state dict of one VAE config, in one dtype and GroupNorm eps."""

    def __init__(self, config: dict, dtype: torch.dtype, eps: float | None = None):
        self.vae = build_vae(config).to(dtype).eval()
        if eps is not None:
            for module in self.vae.modules():
                if isinstance(module, nn.GroupNorm):
                    module.eps = eps
        side = config["sample_size"] // 2 ** (len(config["block_out_channels"]) - 1)
        generator = torch.Generator().manual_seed(1234)
        self.latents = torch.randn(4, config["latent_channels"], side, side, generator=generator).to(dtype)

    @torch.no_grad()
    def __call__(self, state_dict: dict[str, torch.Tensor]) -> torch.Tensor:
        self.vae.load_state_dict(state_dict)
        return self.vae.decode(self.latents).sample


def base_state_dict(
    config: dict, dtype: torch.dtype = torch.float32, seed: int = 0
) -> dict[str, torch.Tensor]:
    """A random-init VAE whose normalisation affines are random too.

    At init every GroupNorm has weight 1 and bias 0, which would hide mistakes such as negating
    the norm2 bias under a sign flip; a trained decoder's affines are far from that.
    """
    torch.manual_seed(seed)
    # Clone: a module's state_dict() aliases its parameters, which load_state_dict later overwrites.
    state_dict = {k: v.detach().clone() for k, v in build_vae(config).state_dict().items()}
    for key, value in state_dict.items():
        if "norm" in key:  # GroupNorm weights and biases (norm1, norm2, group_norm, conv_norm_out)
            value.add_(0.3 * torch.randn_like(value))
    return {k: v.to(dtype) for k, v in state_dict.items()}


def psnr(reference: torch.Tensor, other: torch.Tensor) -> float:
    """PSNR with the reference's own value range as the peak (a random decoder's output is not in [-1, 1])."""
    peak = (reference.max() - reference.min()).item()
    mse = ((reference - other) ** 2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(peak**2 / mse)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def assert_state_dicts_close(actual: dict, expected: dict, rtol: float) -> None:
    assert actual.keys() == expected.keys()
    for key, value in expected.items():
        scale = value.abs().max().clamp_min(1e-12)
        err = ((actual[key].double() - value.double()).abs().max() / scale).item()
        assert err <= rtol, f"{key}: relative error {err:.2e}"



@pytest.fixture(scope="module")
def tiny_sd() -> dict[str, torch.Tensor]:
    return base_state_dict(TINY_VAE_CONFIG)


# -- sites and draws ---------------------------------------------------------------------------


def test_sites_are_the_decoder_resnets(tiny_sd):
    sites = find_act_sites(tiny_sd)
    # mid block: 2 resnets; 3 up blocks of layers_per_block + 1 = 2 resnets each.
    assert sites == ["decoder.mid_block.resnets.0", "decoder.mid_block.resnets.1"] + [
        f"decoder.up_blocks.{b}.resnets.{r}" for b in range(3) for r in range(2)
    ]
    assert find_act_sites(dict(reversed(list(tiny_sd.items())))) == sites


@pytest.mark.parametrize("act_type", ACT_TYPES)
def test_draw_structure(tiny_sd, act_type):
    groups = TINY_VAE_CONFIG["norm_num_groups"]
    params = draw_act(tiny_sd, act_type, groups, seed=7)
    assert list(params) == find_act_sites(tiny_sd)
    for site, p in params.items():
        channels = tiny_sd[f"{site}.conv1.weight"].shape[0]
        size = channels // groups
        assert sorted(p.perm.tolist()) == list(range(channels))
        # Whole groups go to whole groups.
        source_groups = (p.perm // size).view(groups, size)
        assert (source_groups == source_groups[:, :1]).all()
        assert (p.sign.view(groups, size) == p.sign.view(groups, size)[:, :1]).all()
        assert (p.scale.view(groups, size) == p.scale.view(groups, size)[:, :1]).all()
        assert set(p.sign.tolist()) <= {-1.0, 1.0}
        assert ((p.scale >= 0.25) & (p.scale <= 4.0)).all()
        assert (p.perm != torch.arange(channels)).any() == (act_type in ("permute", "all"))
        assert (p.sign < 0).any() == (act_type in ("sign", "all"))
        assert (p.scale != 1).any() == (act_type in ("scale", "all"))


@pytest.mark.parametrize("act_type", [t for t in ACT_TYPES if t != "none"])
def test_seeds_decide_the_copy(tiny_sd, act_type):
    groups = TINY_VAE_CONFIG["norm_num_groups"]
    a = apply_act(tiny_sd, draw_act(tiny_sd, act_type, groups, seed=1))
    a_again = apply_act(tiny_sd, draw_act(tiny_sd, act_type, groups, seed=1))
    b = apply_act(tiny_sd, draw_act(tiny_sd, act_type, groups, seed=2))
    assert all(torch.equal(a[k], a_again[k]) for k in a)
    site = find_act_sites(tiny_sd)[0]
    assert not torch.equal(a[f"{site}.conv1.weight"], b[f"{site}.conv1.weight"])
    assert not torch.equal(a[f"{site}.conv1.weight"], tiny_sd[f"{site}.conv1.weight"])


def test_none_is_identity(tiny_sd):
    out = apply_act(tiny_sd, draw_act(tiny_sd, "none", TINY_VAE_CONFIG["norm_num_groups"], seed=3))
    assert all(torch.equal(out[k], v) for k, v in tiny_sd.items())


def test_apply_act_is_pure_and_keeps_dtype(tiny_sd):
    groups = TINY_VAE_CONFIG["norm_num_groups"]
    before = {k: v.clone() for k, v in tiny_sd.items()}
    out = apply_act(tiny_sd, draw_act(tiny_sd, "all", groups, seed=5))
    assert all(torch.equal(tiny_sd[k], before[k]) for k in before)
    for key, value in out.items():
        assert value.dtype == tiny_sd[key].dtype
        assert value.data_ptr() != tiny_sd[key].data_ptr()  # no aliasing: in-place attacks stay local
    half = {k: v.half() for k, v in tiny_sd.items()}
    assert all(
        v.dtype == torch.float16 for v in apply_act(half, draw_act(half, "all", groups, seed=5)).values()
    )


def test_unknown_act_type_and_bad_groups(tiny_sd):
    with pytest.raises(ConfigError, match="unknown ACT type"):
        draw_act(tiny_sd, "rotate", 8, seed=0)
    with pytest.raises(ConfigError, match="groups"):
        draw_act(tiny_sd, "permute", 5, seed=0)
    with pytest.raises(ConfigError, match="scale range"):
        draw_act(tiny_sd, "scale", 8, seed=0, scale_range=(2.0, 1.0))


def test_derive_act_seed():
    seed = derive_act_seed(b"distributor-secret", "alice")
    assert seed == derive_act_seed(b"distributor-secret", "alice")
    # HMAC-SHA256(secret, user_id), first 8 bytes >> 1 (the docstring). The seed is not stored: a changed
    # derivation would give every issued user a seed other than the one their copy was made with
    assert seed == 7437405532800818107
    assert seed != derive_act_seed(b"distributor-secret", "bob")
    assert seed != derive_act_seed(b"another-secret", "alice")
    with pytest.raises(ConfigError):
        derive_act_seed(b"", "alice")


# -- function preservation ---------------------------------------------------------------------


@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("act_type", ACT_TYPES)
def test_act_preserves_the_decoder(config_name, act_type):
    """Exact reparametrization: at GroupNorm eps 0 every type is function-preserving to rounding.

    At the stock eps (1e-6) permutation and sign stay exact; scaling by s changes a group's
    normaliser from sqrt(var + eps) to sqrt(var + eps / s**2), an error linear in eps, checked by
    dividing eps by 100.
    """
    config = CONFIGS[config_name]
    groups = config["norm_num_groups"]
    base64 = base_state_dict(config, torch.float64)
    copy64 = apply_act(base64, draw_act(base64, act_type, groups, seed=11))

    exact = Decoder(config, torch.float64, eps=0.0)
    diff_exact = max_diff(exact(copy64), exact(base64))
    assert diff_exact <= 1e-5
    assert diff_exact <= 1e-12  # what rounding alone gives in float64 (measured ~1e-14)

    stock = Decoder(config, torch.float64)
    diff_stock = max_diff(stock(copy64), stock(base64))
    small_eps = Decoder(config, torch.float64, eps=1e-8)
    diff_small_eps = max_diff(small_eps(copy64), small_eps(base64))
    if act_type in ("scale", "all"):
        assert diff_stock <= 1e-3  # measured 1-2e-4 at scales in [1/4, 4]
        assert diff_small_eps <= diff_stock / 30  # linear in eps: the eps is the whole error
    else:
        assert diff_stock <= 1e-12

    base32 = base_state_dict(config, torch.float32)
    copy32 = apply_act(base32, draw_act(base32, act_type, groups, seed=11))
    stock32, exact32 = Decoder(config, torch.float32), Decoder(config, torch.float32, eps=0.0)
    diff32 = max_diff(stock32(copy32), stock32(base32))
    diff32_exact = max_diff(exact32(copy32), exact32(base32))
    print(
        f"[{config_name}] {act_type:8s} float64 max|diff| eps0 {diff_exact:.1e} eps1e-6 {diff_stock:.1e}"
        f" | float32 eps1e-6 {diff32:.1e} eps0 {diff32_exact:.1e}"
    )
    assert diff32 <= 1e-3


# -- colluders ---------------------------------------------------------------------------------


def test_align_recovers_a_known_transform(tiny_sd):
    groups = TINY_VAE_CONFIG["norm_num_groups"]
    copy = apply_act(tiny_sd, draw_act(tiny_sd, "all", groups, seed=21))
    aligned = align_to_reference(copy, tiny_sd, groups)
    assert_state_dicts_close(aligned, tiny_sd, rtol=1e-6)
    # Non-ACT tensors are the copy's own, untouched.
    site_keys = {f"{s}.{x}" for s in find_act_sites(tiny_sd) for x in SITE_SUFFIXES}
    assert all(torch.equal(aligned[k], copy[k]) for k in copy if k not in site_keys)
    # One copy aligned onto another lines up with that other copy, not with the base.
    other = apply_act(tiny_sd, draw_act(tiny_sd, "all", groups, seed=22))
    assert_state_dicts_close(align_to_reference(copy, other, groups), other, rtol=1e-6)


@pytest.mark.parametrize("act_type", ["permute", "sign", "all"])
def test_naive_averaging_breaks_the_decoder(act_type):
    """Measured on this random-init tiny VAE (seed 0), 2 copies: permute 21.6, sign 19.6, all 19.8 dB
    (over 4 VAE seeds x 3 copy pairs: permute 18.2-21.6, sign 18.2-21.3, all 17.6-20.8 dB)."""
    config = TINY_VAE_CONFIG
    groups = config["norm_num_groups"]
    base = base_state_dict(config, torch.float64)
    decode = Decoder(config, torch.float64)
    copies = [apply_act(base, draw_act(base, act_type, groups, seed=s)) for s in (0, 1)]
    quality = psnr(decode(base), decode(average_state_dicts(copies)))
    print(f"2-copy average, {act_type}: PSNR {quality:.1f} dB")
    assert quality < 25.0


def test_naive_averaging_of_scaled_copies_is_harmless():
    """GroupNorm absorbs per-group scale: averaging scaled copies leaves scaled rows (s1 + s2) / 2 of the
    same direction, so the average is itself a scaled copy. Measured: 115.7 dB (109-116 over seeds)."""
    config = TINY_VAE_CONFIG
    groups = config["norm_num_groups"]
    base = base_state_dict(config, torch.float64)
    decode = Decoder(config, torch.float64)
    copies = [apply_act(base, draw_act(base, "scale", groups, seed=s)) for s in (0, 1)]
    quality = psnr(decode(base), decode(average_state_dicts(copies)))
    print(f"2-copy average, scale: PSNR {quality:.1f} dB")
    assert quality > 90.0
    # ... and is exact at eps 0, where GroupNorm's scale invariance has no error term.
    exact = Decoder(config, torch.float64, eps=0.0)
    assert max_diff(exact(base), exact(average_state_dicts(copies))) <= 1e-10


def test_aligned_average_undoes_act(tiny_sd):
    groups = TINY_VAE_CONFIG["norm_num_groups"]
    copies = [apply_act(tiny_sd, draw_act(tiny_sd, "all", groups, seed=s)) for s in (31, 32)]
    # With the untouched base first (the reference), the merge is the base itself.
    assert_state_dicts_close(aligned_average([tiny_sd, *copies], groups), tiny_sd, rtol=1e-6)
    # Without it, the merge is the first copy's parametrization, which computes the base's function.
    merged = aligned_average(copies, groups)
    assert_state_dicts_close(merged, copies[0], rtol=1e-6)
    base64, merged64 = ({k: v.double() for k, v in sd.items()} for sd in (tiny_sd, merged))
    exact = Decoder(TINY_VAE_CONFIG, torch.float64, eps=0.0)
    assert max_diff(exact(merged64), exact(base64)) <= 1e-5


def test_average_state_dicts_weights():
    a = {"w": torch.tensor([0.0, 4.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([4.0, 0.0]), "n": torch.tensor(9)}
    out = average_state_dicts([a, b], weights=[3.0, 1.0])
    assert torch.allclose(out["w"], torch.tensor([1.0, 3.0]))
    assert out["w"].dtype == torch.float32
    assert out["n"].item() == 3  # integer buffers come from the first
    with pytest.raises(ConfigError):
        average_state_dicts([a, b], weights=[1.0])
    with pytest.raises(ConfigError):
        average_state_dicts([a, {"w": torch.zeros(2)}])


# -- residual-stream ACT -----------------------------------------------------------------------


@pytest.mark.parametrize("scope", ["stream", "both"])
@pytest.mark.parametrize("act_type", ["permute", "sign", "all"])
def test_stream_act_preserves_the_decoder(scope, act_type):
    """Stream ACT rewrites every writer, reader and norm of each residual-stream segment (and the bias
    map at conv_norm_out): exact at eps 0; the stock eps leaves the scale's eps term (measured 1e-4)."""
    config = TINY_VAE_CONFIG
    groups = config["norm_num_groups"]
    base = base_state_dict(config, torch.float64)
    params = draw_act(base, act_type, groups, seed=13, scope=scope)
    segments = find_stream_segments(base)
    assert [s.name for s in segments] == [
        "decoder.conv_in",
        "decoder.up_blocks.0.upsamplers.0.conv",
        "decoder.up_blocks.1.resnets.0.conv_shortcut",
        "decoder.up_blocks.1.upsamplers.0.conv",
        "decoder.up_blocks.2.resnets.0.conv_shortcut",
    ]
    assert {k for k in params if k.startswith(STREAM_PREFIX)} == {STREAM_PREFIX + s.name for s in segments}
    assert any(not k.startswith(STREAM_PREFIX) for k in params) == (scope == "both")
    copy = apply_act(base, params)
    exact = Decoder(config, torch.float64, eps=0.0)
    assert max_diff(exact(copy), exact(base)) <= 1e-12
    stock = Decoder(config, torch.float64)
    assert max_diff(stock(copy), stock(base)) <= (1e-3 if act_type == "all" else 1e-12)
    # The last segment ends at conv_norm_out: a bias map there is permuted with it.
    bias_map = torch.randn(1, 16, 4, 4, dtype=torch.float64)
    with_map = apply_act({**base, "decoder.conv_norm_out.bias_map": bias_map}, params)
    perm = params[STREAM_PREFIX + segments[-1].name].perm
    assert torch.equal(with_map["decoder.conv_norm_out.bias_map"], bias_map[:, perm])


def test_alignment_undoes_stream_and_interior_act(tiny_sd):
    groups = TINY_VAE_CONFIG["norm_num_groups"]
    copy = apply_act(tiny_sd, draw_act(tiny_sd, "all", groups, seed=41, scope="both"))
    assert_state_dicts_close(align_to_reference(copy, tiny_sd, groups), tiny_sd, rtol=1e-6)
    copies = [apply_act(tiny_sd, draw_act(tiny_sd, "all", groups, seed=s, scope="both")) for s in (42, 43)]
    assert_state_dicts_close(aligned_average([tiny_sd, *copies], groups), tiny_sd, rtol=1e-6)


def test_stream_scale_is_not_absorbed_by_averaging():
    """Unlike interior scaling, a stream scale also divides linear readers' columns (conv_shortcut,
    up-sampler convs): the average of (s1 + s2) / 2 rows and (1/s1 + 1/s2) / 2 columns is no copy.
    Measured on this random-init tiny VAE: 22.3 dB (interior scale: 308 dB, i.e. exact)."""
    config = TINY_VAE_CONFIG
    groups = config["norm_num_groups"]
    base = base_state_dict(config, torch.float64)
    decode = Decoder(config, torch.float64)
    copies = [apply_act(base, draw_act(base, "scale", groups, seed=s, scope="stream")) for s in (0, 1)]
    assert psnr(decode(base), decode(average_state_dicts(copies))) < 40.0


def test_stream_act_refuses_unknown_decoder_layers(tiny_sd):
    odd = {**tiny_sd, "decoder.extra_proj.weight": torch.zeros(4, 4)}
    with pytest.raises(ConfigError, match="extra_proj"):
        find_stream_segments(odd)
    with pytest.raises(ConfigError, match="scope"):
        draw_act(tiny_sd, "all", 8, seed=0, scope="everywhere")
