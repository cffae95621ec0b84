"""The decoder modules a PNM modulates per sample, with the stock modules' parameter names, so a
user's copy is a plain diffusers ``AutoencoderKL`` (fingerprint_lm/models/pnm.py sets what they hold).

* :class:`ModulatedGroupNorm`: per-channel affine scale/shift and the carrier's tiled bias map;
* :class:`ModulatedConv2d`: WOUAF-style input-channel scales and a per-sample additive kernel.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F


class ModulatedGroupNorm(nn.GroupNorm):
    """GroupNorm whose affine output is modulated per sample; same ``weight``/``bias`` names.

    ``scale`` [B,C] and ``shift`` [B,C] give ``(1 + scale) * gamma * GN(x) + beta + shift``;
    ``bias_map`` [B,C,T,T] is tiled over the output (periodic spatial bias). All default to None,
    in which case the module is exactly ``nn.GroupNorm``.
    """

    scale: torch.Tensor | None = None
    shift: torch.Tensor | None = None
    bias_map: torch.Tensor | None = None

    @classmethod
    def from_group_norm(cls, norm: nn.GroupNorm) -> ModulatedGroupNorm:
        like = {"device": norm.weight.device, "dtype": norm.weight.dtype} if norm.affine else {}
        new = cls(norm.num_groups, norm.num_channels, eps=norm.eps, affine=norm.affine, **like)
        if norm.affine and not norm.weight.is_meta:  # meta: a shape-only model (SD layout checks)
            new.load_state_dict(norm.state_dict())
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        # Applied to the fused GroupNorm output so zero modulation is bit-exact:
        # (1 + s) * gamma * GN(x) + beta + t = out * (1 + s) + (t - s * beta), one fused
        # multiply-add over the activation (it is the size that matters at SD scale). The
        # coefficients follow the activation's dtype (bf16 heads under autocast, fp32 GroupNorm).
        if self.scale is not None or self.shift is not None:
            per_channel = torch.zeros(out.shape[:2], dtype=out.dtype, device=out.device)
            gain = torch.ones_like(per_channel)
            if self.scale is not None:
                scale = self.scale.to(out.dtype)
                gain = gain + scale
                per_channel = per_channel - scale * self.bias.to(out.dtype)
            if self.shift is not None:
                per_channel = per_channel + self.shift.to(out.dtype)
            out = torch.addcmul(per_channel[:, :, None, None], out, gain[:, :, None, None])
        if self.bias_map is not None:
            out = out + tile_to(self.bias_map.to(out.dtype), out.shape[-2:])
        return out


class ModulatedConv2d(nn.Conv2d):
    """Conv2d modulated per sample; same ``weight``/``bias`` names. ``in_scale`` [B, C_in] gives
    ``conv((1 + in_scale) * x)`` (WOUAF's weight modulation), the stock conv with
    ``weight[:, c] * (1 + in_scale[c])`` (zero padding stays zero); ``weight_delta``
    [B, C_out, C_in, k, k] adds a per-sample kernel on top, the stock conv with weight
    ``weight * (1 + in_scale) + weight_delta``. So a user's copy is a plain ``Conv2d``. None:
    exactly ``nn.Conv2d``."""

    in_scale: torch.Tensor | None = None
    weight_delta: torch.Tensor | None = None

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> ModulatedConv2d:
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                  conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
                  device=conv.weight.device, dtype=conv.weight.dtype)
        if not conv.weight.is_meta:
            new.load_state_dict(conv.state_dict())
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x if self.in_scale is None else x * (1 + self.in_scale.to(x.dtype))[:, :, None, None])
        if self.weight_delta is None:
            return out
        if self.groups != 1 or self.padding_mode != "zeros":
            raise ValueError("a per-sample kernel needs an ungrouped, zero-padded conv")
        # One grouped conv runs every sample's own kernel: the batch becomes the groups.
        batch, delta = x.shape[0], self.weight_delta.to(x.dtype)
        delta = delta.expand(batch, *delta.shape[1:])  # one code for the whole batch: [1, ...]
        extra = F.conv2d(x.reshape(1, -1, *x.shape[-2:]), delta.reshape(-1, *delta.shape[2:]), None,
                         self.stride, self.padding, self.dilation, groups=batch)
        return out + extra.reshape(batch, -1, *extra.shape[-2:])


# What each modulated module holds while ``PersonalizedDecoder.fingerprinted`` is active.
_MODULATION_SLOTS = {ModulatedGroupNorm: ("scale", "shift", "bias_map"), ModulatedConv2d: ("in_scale", "weight_delta")}


def _modulated_modules(module: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in module.named_modules() if type(m) in _MODULATION_SLOTS}


def tile_to(tile: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Repeat a [B,C,T,T] tile periodically to cover [B,C,H,W] (cropping the last period)."""
    height, width = size
    t_h, t_w = tile.shape[-2:]
    reps = (math.ceil(height / t_h), math.ceil(width / t_w))
    return tile.repeat(1, 1, *reps)[..., :height, :width]
