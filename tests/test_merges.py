"""Collusion merges of copies' state dicts: identity on identical copies, element-wise rules, the
seeded weighted average, and the adaptive colluder's alignment undoing ACT exactly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fingerprint_lm.attacks.collusion import (
    IMAGE_MERGES,
    MERGES,
    image_blend,
    image_mix,
    max_abs,
    merge_copies,
    mix_owners,
    power_mean,
    sign_consensus,
    weighted_average,
)
from fingerprint_lm.errors import ConfigError
from fingerprint_lm.models.act import apply_act, draw_act
from fingerprint_lm.models.act_alignment import average_state_dicts
from fingerprint_lm.models.vae import build_vae
from tests.state_dicts import GROUPS, SMALL_VAE_CONFIG, assert_same_state, clone, random_affine_state_dict


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    return random_affine_state_dict()


# -- collusion merges -----------------------------------------------------------------------


@pytest.mark.parametrize("name", list(MERGES))
def test_merge_of_identical_copies_is_the_copy(state, name):
    merged = merge_copies(
        name, [state, clone(state), clone(state)], torch.Generator().manual_seed(0), num_groups=GROUPS
    )
    assert_same_state(merged, state, atol=1e-6)


@pytest.mark.parametrize("name", [n for n in MERGES if n != "aligned_average"])
def test_merge_of_different_copies_differs_from_both(state, name):
    other = random_affine_state_dict(seed=1)
    merged = merge_copies(name, [state, other], torch.Generator().manual_seed(0))
    key = "decoder.conv_in.weight"
    assert not torch.equal(merged[key], state[key]) and not torch.equal(merged[key], other[key])


def test_nonlinear_merges_elementwise():
    a = {"w": torch.tensor([1.0, -4.0, 2.0, 0.0]), "step": torch.tensor(3)}
    b = {"w": torch.tensor([2.0, 3.0, 2.0, 0.0]), "step": torch.tensor(5)}
    c = {"w": torch.tensor([-3.0, 1.0, -1.0, 0.0]), "step": torch.tensor(7)}
    assert torch.equal(max_abs([a, b, c])["w"], torch.tensor([-3.0, -4.0, 2.0, 0.0]))
    assert max_abs([a, b, c])["step"].item() == 3  # integer buffers come from the first copy
    # majority sign, mean of the agreeing entries: (1+2)/2, (3+1)/2, (2+2)/2, 0
    assert torch.equal(sign_consensus([a, b, c])["w"], torch.tensor([1.5, 2.0, 2.0, 0.0]))
    # tie (one each): the sign of the sum wins
    assert torch.equal(sign_consensus([a, c])["w"][:3], torch.tensor([-3.0, -4.0, 2.0]))
    torch.testing.assert_close(power_mean([a, b, c], p=1.0)["w"], average_state_dicts([a, b, c])["w"])
    cubic = power_mean([a, b], p=3.0)["w"][0].item()
    assert cubic == pytest.approx(((1 + 8) / 2) ** (1 / 3))


def test_weighted_average_is_seeded_convex_combination():
    a = {"w": torch.zeros(3)}
    b = {"w": torch.ones(3)}
    first = weighted_average([a, b], torch.Generator().manual_seed(1))["w"]
    again = weighted_average([a, b], torch.Generator().manual_seed(1))["w"]
    other = weighted_average([a, b], torch.Generator().manual_seed(2))["w"]
    assert torch.equal(first, again) and not torch.equal(first, other)
    assert 0 < first[0].item() < 1 and torch.allclose(first, first[0].expand(3))


def test_aligned_average_needs_groups(state):
    with pytest.raises(ConfigError):
        MERGES["aligned_average"]([state, state])
    with pytest.raises(ConfigError):
        merge_copies("no_such_merge", [state])


@torch.no_grad()
@pytest.mark.parametrize("act_type", ["permute", "all"])
def test_aligned_average_undoes_act(act_type):
    base = random_affine_state_dict(torch.float64)
    vae = build_vae(SMALL_VAE_CONFIG).double().eval()
    for module in vae.modules():  # eps 0: scaling is then exactly invariant, so only rounding remains
        if isinstance(module, nn.GroupNorm):
            module.eps = 0.0
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def decode(state_dict):
        vae.load_state_dict(state_dict)
        return vae.decode(latents).sample

    copies = [apply_act(base, draw_act(base, act_type, GROUPS, seed)) for seed in (11, 12, 13)]
    reference = decode(base)
    aligned = decode(merge_copies("aligned_average", copies, num_groups=GROUPS))
    naive = decode(merge_copies("average", copies))
    assert (aligned - reference).abs().max().item() < 1e-9
    assert (naive - reference).abs().max().item() > 1e-2  # ACT does scramble a naive average


# -- image-level collusion ---------------------------------------------------------------------------
def _batches(c: int, n: int = 12) -> list[torch.Tensor]:
    """Colluder j's images are all j (so the owner of a mixed image can be read off its pixels)."""
    return [torch.full((n, 3, 4, 4), float(j)) for j in range(c)]


def test_image_mix_takes_each_image_whole_from_one_colluder_seeded():
    mixed = image_mix(_batches(3), torch.Generator().manual_seed(0))
    owners = mixed.flatten(1)
    assert torch.equal(owners.min(dim=1).values, owners.max(dim=1).values)  # one colluder per image
    assert set(owners[:, 0].long().tolist()) == {0, 1, 2}
    assert torch.equal(owners[:, 0].long(), mix_owners(3, 12, torch.Generator().manual_seed(0)))
    assert torch.equal(mixed, image_mix(_batches(3), torch.Generator().manual_seed(0)))
    assert not torch.equal(mixed, image_mix(_batches(3), torch.Generator().manual_seed(1)))


def test_image_blend_is_the_pixelwise_mean_and_bad_batches_are_refused():
    assert torch.equal(image_blend(_batches(4)), torch.full((12, 3, 4, 4), 1.5))
    with pytest.raises(ConfigError, match="at least 2"):
        image_blend(_batches(1))
    with pytest.raises(ConfigError, match="share one"):
        image_mix([torch.zeros(2, 3, 4, 4), torch.zeros(3, 3, 4, 4)])
    assert set(IMAGE_MERGES) == {"image_mix", "image_blend"}
