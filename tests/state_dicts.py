"""A small VAE and its state dicts with random norm affines, for the attack and merge tests."""

from __future__ import annotations

import torch

from fingerprint_lm.models.vae import TINY_VAE_CONFIG, build_vae

SMALL_VAE_CONFIG = {
    **TINY_VAE_CONFIG,
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
    "block_out_channels": [8, 16],
    "norm_num_groups": 4,
    "sample_size": 16,
}
GROUPS = SMALL_VAE_CONFIG["norm_num_groups"]


def random_affine_state_dict(dtype: torch.dtype = torch.float32, seed: int = 0) -> dict[str, torch.Tensor]:
    """A small VAE's state dict with random norm affines (init values 1/0 would hide mistakes)."""
    torch.manual_seed(seed)
    state = {k: v.detach().clone() for k, v in build_vae(SMALL_VAE_CONFIG).state_dict().items()}
    for key, value in state.items():
        if "norm" in key:
            value.add_(0.3 * torch.randn_like(value))
    return {k: v.to(dtype) for k, v in state.items()}


def clone(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in state.items()}


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=key)
