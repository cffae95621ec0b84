"""Anti-Collusion Transformations (ACT) on the interior channels of a VAE decoder's ResnetBlocks.

A decoder ResnetBlock computes ``conv2(dropout(SiLU(norm2(conv1(h)))))``; its *interior*
channels run from the rows of ``conv1`` to the input columns of ``conv2``. ``norm2`` is a
GroupNorm, so the following reparametrizations leave the block's output unchanged:

- ``permute``: permute whole groups and the channels within each group (conv1 rows and bias,
  norm2 weight and bias, conv2 input columns). Exact: GroupNorm statistics are per group.
- ``sign``: negate whole groups (conv1 rows and bias, norm2 weight). ``GN(-x) = -GN(x)`` within a
  group, so the norm2 bias stays. Exact.
- ``scale``: multiply whole groups by ``s > 0`` (conv1 rows and bias). GroupNorm divides it out,
  exactly up to its ``eps``: ``GN(s x)`` normalises by ``sqrt(var + eps / s**2)``.
- ``all``: the three together; ``none``: the identity.

The same three transformations also act on the decoder's residual stream
(:mod:`fingerprint_lm.models.residual_stream`): each stretch between layers that replace the hidden
state is permuted, negated and scaled per group, with every writer, reader and GroupNorm of that
stretch rewritten (a linear reader divides the scale out, so stream scaling is *not* absorbed by
averaging as interior scaling is). ``scope`` picks ``interior``, ``stream`` or ``both``; the configs
ship ``stream``, which wrecked 2-party averages the most (``experiments/act_scope_search.py``).

Every function works on a plain diffusers ``AutoencoderKL`` state dict, so a transformed copy is
still a stock diffusers VAE. The adaptive colluder's maths, which undoes any such transformation
by matching rows between two copies, is in :mod:`fingerprint_lm.models.act_alignment`.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from fingerprint_lm.config_schema import ACT_SCOPES, ACT_TYPES  # the choices the act config group checks
from fingerprint_lm.errors import ConfigError
from fingerprint_lm.models.residual_stream import StreamSegment, find_stream_segments

STREAM_PREFIX = "stream:"  # ACT parameter keys of stream segments: "stream:<segment name>"

# Only decoder blocks: the encoder never leaves the distributor and is not fingerprinted.
_SITE_PATTERN = re.compile(r"^(?:.*\.)?decoder\.(?:mid_block|up_blocks\.\d+)\.resnets\.\d+$")
_SITE_SUFFIXES = ("conv1.weight", "conv1.bias", "norm2.weight", "norm2.bias", "conv2.weight")

StateDict = dict[str, torch.Tensor]


@dataclass
class ActParams:
    """The transformation of one site, indexed by the *transformed* channel ``i``.

    Transformed channel ``i`` is original channel ``perm[i]`` multiplied by ``sign[i] * scale[i]``
    (conv1 rows and bias), with norm2 weight ``sign[i] * weight[perm[i]]``, norm2 bias
    ``bias[perm[i]]`` and conv2 input column ``perm[i]``.

    Parameters:
        perm (`torch.LongTensor` of shape `(C,)`): maps whole groups to whole groups.
        sign (`torch.Tensor` of shape `(C,)`): +1 or -1, constant within each group.
        scale (`torch.Tensor` of shape `(C,)`): positive, constant within each group.
    """

    perm: torch.Tensor
    sign: torch.Tensor
    scale: torch.Tensor


def _natural_key(name: str) -> list[object]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def find_act_sites(state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Prefixes of the decoder ResnetBlocks ACT can act on, in natural (numeric-aware) order.

    A site is a ``decoder.mid_block.resnets.N`` or ``decoder.up_blocks.M.resnets.N`` prefix that has
    conv1 weight and bias, norm2 weight and bias and conv2 weight. Blocks with a time embedding
    (``time_emb_proj``) are skipped: their interior also receives ``temb``.
    """
    sites = set()
    for key in state_dict:
        if not key.endswith(".conv1.weight"):
            continue
        prefix = key[: -len(".conv1.weight")]
        if not _SITE_PATTERN.match(prefix):
            continue
        if all(f"{prefix}.{suffix}" in state_dict for suffix in _SITE_SUFFIXES) and (
            f"{prefix}.time_emb_proj.weight" not in state_dict
        ):
            sites.add(prefix)
    return sorted(sites, key=_natural_key)


def site_channels(state_dict: Mapping[str, torch.Tensor], site: str, num_groups: int) -> int:
    channels = state_dict[f"{site}.conv1.weight"].shape[0]
    if num_groups <= 0 or channels % num_groups != 0:
        raise ConfigError(f"{site}: {channels} interior channels do not split into {num_groups} groups")
    return channels


def draw_act(
    state_dict: Mapping[str, torch.Tensor],
    act_type: str,
    num_groups: int,
    seed: int,
    scale_range: tuple[float, float] = (0.25, 4.0),
    scope: str = "interior",
) -> dict[str, ActParams]:
    """Draw one copy's transformation for every site of ``state_dict``; deterministic given ``seed``.

    Parameters:
        state_dict: a diffusers ``AutoencoderKL`` (or decoder-containing) state dict.
        act_type (`str`): one of :data:`ACT_TYPES`.
        num_groups (`int`): the GroupNorm group count (``vae.config.norm_num_groups``).
        seed (`int`): e.g. from :func:`derive_act_seed`.
        scale_range (`tuple[float, float]`): the log-uniform range of the group scales.
        scope (`str`): one of :data:`ACT_SCOPES`. Interior sites are drawn first, so ``interior``
            and ``both`` give the same interior transformation for one seed.

    Returns:
        ``{site prefix: ActParams}`` for interior sites and ``{"stream:<segment>": ActParams}`` for
        residual-stream segments.
    """
    if act_type not in ACT_TYPES:
        raise ConfigError(f"unknown ACT type {act_type!r}; expected one of {', '.join(ACT_TYPES)}")
    spaces = act_spaces(state_dict, num_groups, scope)
    drawn = draw_spaces([channels for _, channels in spaces], act_type, num_groups, seed, scale_range)
    return {key: params for (key, _), params in zip(spaces, drawn, strict=True)}


def act_spaces(state_dict: Mapping[str, torch.Tensor], num_groups: int, scope: str) -> list[tuple[str, int]]:
    """``(ACT parameter key, channels)`` of every site and stream segment of ``state_dict`` that
    :func:`draw_act` draws for, in its draw order (interior sites first)."""
    if scope not in ACT_SCOPES:
        raise ConfigError(f"unknown ACT scope {scope!r}; expected one of {', '.join(ACT_SCOPES)}")
    spaces: list[tuple[str, int]] = []
    if scope in ("interior", "both"):
        spaces += [(site, site_channels(state_dict, site, num_groups)) for site in find_act_sites(state_dict)]
    if scope in ("stream", "both"):
        for segment in find_stream_segments(state_dict):
            if segment.channels % num_groups:
                raise ConfigError(f"{segment.name}: {segment.channels} channels do not split into {num_groups} groups")
            spaces.append((STREAM_PREFIX + segment.name, segment.channels))
    return spaces


def draw_spaces(
    channels: list[int], act_type: str, num_groups: int, seed: int, scale_range: tuple[float, float] = (0.25, 4.0)
) -> list[ActParams]:
    """One transformation per channel space, drawn in order from one generator seeded with
    ``seed``: :func:`draw_act`'s draws (and the compiled issuance's, experiments/compiled_issue_probe.py)."""
    if act_type not in ACT_TYPES:
        raise ConfigError(f"unknown ACT type {act_type!r}; expected one of {', '.join(ACT_TYPES)}")
    scale_min, scale_max = check_scale_range(scale_range)
    generator = torch.Generator().manual_seed(int(seed))
    return [_draw_channels(c, num_groups, act_type, generator, scale_min, scale_max) for c in channels]


def check_scale_range(scale_range: tuple[float, float]) -> tuple[float, float]:
    scale_min, scale_max = (float(v) for v in scale_range)
    if not 0.0 < scale_min <= scale_max:
        raise ConfigError(f"ACT scale range must satisfy 0 < min <= max, got {scale_range}")
    return scale_min, scale_max


def _draw_channels(
    channels: int, num_groups: int, act_type: str, generator: torch.Generator, scale_min: float, scale_max: float
) -> ActParams:
    """Group permutation + within-group permutations, group signs and group scales for one site."""
    group_size = channels // num_groups
    perm, sign_bits, uniform = draw_raw(channels, num_groups, act_type, generator)
    group_sign = torch.ones(num_groups, dtype=torch.float64) if sign_bits is None else sign_bits.double() * 2 - 1
    group_scale = (torch.ones(num_groups, dtype=torch.float64) if uniform is None
                   else log_uniform(uniform, scale_min, scale_max))
    return ActParams(
        perm=perm,
        sign=group_sign.repeat_interleave(group_size),
        scale=group_scale.repeat_interleave(group_size),
    )


def draw_raw(
    channels: int, num_groups: int, act_type: str, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """One space's draws in their fixed order: the channel permutation (group order, then each
    group's own order), the group sign bits and the group scales' uniforms (None: not drawn)."""
    group_size = channels // num_groups
    perm, sign_bits, uniform = torch.arange(channels), None, None
    if act_type in ("permute", "all"):
        group_order = torch.randperm(num_groups, generator=generator)
        within = torch.stack([torch.randperm(group_size, generator=generator) for _ in range(num_groups)])
        perm = (group_order[:, None] * group_size + within).reshape(-1)
    if act_type in ("sign", "all"):
        sign_bits = torch.randint(0, 2, (num_groups,), generator=generator)
    if act_type in ("scale", "all"):
        uniform = torch.rand(num_groups, generator=generator, dtype=torch.float64)
    return perm, sign_bits, uniform


def log_uniform(uniform: torch.Tensor, scale_min: float, scale_max: float) -> torch.Tensor:
    """Group scales from uniforms in [0, 1): log-uniform over ``[scale_min, scale_max]``."""
    return torch.exp(math.log(scale_min) + uniform * (math.log(scale_max) - math.log(scale_min)))


def clone_state_dict(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    # Copies, not views: callers attack copies in place (weight noise, pruning) and must not reach the base.
    return {key: value.detach().clone() for key, value in state_dict.items()}


def transform_site(
    out: StateDict,
    source: Mapping[str, torch.Tensor],
    site: str,
    perm: torch.Tensor,
    row_factor: torch.Tensor,
    gamma_factor: torch.Tensor,
) -> None:
    """Write into ``out`` the site of ``source`` with channel ``i`` := channel ``perm[i]``.

    conv1 rows and bias are multiplied by ``row_factor``, norm2 weight by ``gamma_factor``.
    Arithmetic is in float64 with one rounding to the stored dtype.
    """
    w1 = source[f"{site}.conv1.weight"]
    shape = (-1,) + (1,) * (w1.dim() - 1)
    updates = {
        "conv1.weight": w1.double()[perm] * row_factor.view(shape),
        "conv1.bias": source[f"{site}.conv1.bias"].double()[perm] * row_factor,
        "norm2.weight": source[f"{site}.norm2.weight"].double()[perm] * gamma_factor,
        "norm2.bias": source[f"{site}.norm2.bias"].double()[perm],
        "conv2.weight": source[f"{site}.conv2.weight"].double()[:, perm],
    }
    for suffix, value in updates.items():
        key = f"{site}.{suffix}"
        out[key] = value.to(source[key].dtype).contiguous()


def transform_segment(
    out: StateDict, source: Mapping[str, torch.Tensor], segment: StreamSegment, perm: torch.Tensor,
    factor: torch.Tensor, sign: torch.Tensor,
) -> None:
    """Write into ``out`` the layers of one stream segment of ``source`` with stream channel ``i`` :=
    channel ``perm[i]`` multiplied by ``factor[i]`` (sign times scale; constant within groups).

    Writers' rows and bias are multiplied by ``factor``; linear readers' columns divided by it;
    GroupNorm readers absorb the scale and take the sign into their weight, so the layers after them
    only see the permutation (their columns are permuted), as does a bias map at the norm
    (``<norm>.bias_map``, channel dim 1, when the state dict holds one). Float64, one rounding.
    """

    def put(key: str, value: torch.Tensor) -> None:
        out[key] = value.to(source[key].dtype).contiguous()

    def column_view(tensor: torch.Tensor) -> tuple[int, ...]:
        return (1, -1) + (1,) * (tensor.dim() - 2)

    for prefix in segment.writers:
        weight = source[f"{prefix}.weight"].double()
        put(f"{prefix}.weight", weight[perm] * factor.view((-1,) + (1,) * (weight.dim() - 1)))
        put(f"{prefix}.bias", source[f"{prefix}.bias"].double()[perm] * factor)
    for prefix in segment.linear_readers:
        weight = source[f"{prefix}.weight"].double()
        put(f"{prefix}.weight", weight[:, perm] / factor.view(column_view(weight)))
    for norm, followers in segment.norm_readers:
        put(f"{norm}.weight", source[f"{norm}.weight"].double()[perm] * sign)
        put(f"{norm}.bias", source[f"{norm}.bias"].double()[perm])
        if f"{norm}.bias_map" in source:
            put(f"{norm}.bias_map", source[f"{norm}.bias_map"].double()[:, perm])
        for prefix in followers:
            put(f"{prefix}.weight", source[f"{prefix}.weight"].double()[:, perm])


def apply_act(state_dict: Mapping[str, torch.Tensor], params: Mapping[str, ActParams]) -> StateDict:
    """Return a transformed copy of ``state_dict``; the input is left untouched.

    Every tensor of the result is a fresh copy (ACT or not), in the input's dtype. Interior sites
    and stream segments touch disjoint parts of each layer (interior: conv1 rows, norm2, conv2
    columns; stream: conv1 columns, norm1, conv2 rows, ...), so their order does not matter.
    """
    out = clone_state_dict(state_dict)
    segments = None
    for site, site_params in params.items():
        if site.startswith(STREAM_PREFIX):
            if segments is None:
                segments = {seg.name: seg for seg in find_stream_segments(state_dict)}
            segment = segments.get(site[len(STREAM_PREFIX) :])
            if segment is None:
                raise ConfigError(f"ACT stream segment {site!r} is not in the state dict")
            _check_params(site, site_params, segment.channels)
            sign = site_params.sign.double()
            transform_segment(
                out, dict(out), segment, site_params.perm.long(), sign * site_params.scale.double(), sign
            )
            continue
        key = f"{site}.conv1.weight"
        if key not in state_dict:
            raise ConfigError(f"ACT site {site!r} is not in the state dict")
        _check_params(site, site_params, state_dict[key].shape[0])
        sign = site_params.sign.double()
        transform_site(
            out,
            out,
            site,
            site_params.perm.long(),
            row_factor=sign * site_params.scale.double(),
            gamma_factor=sign,
        )
    return out


def _check_params(site: str, params: ActParams, channels: int) -> None:
    if not (params.perm.numel() == params.sign.numel() == params.scale.numel() == channels):
        raise ConfigError(f"ACT parameters for {site!r} do not match its {channels} channels")


def derive_act_seed(secret: bytes, user_id: str) -> int:
    """A user's ACT seed: HMAC-SHA256(secret, user_id) truncated to a non-negative 63-bit int.

    Only the distributor, who holds ``secret``, can recompute it; the secret itself never appears
    in a copy or a registry row.
    """
    if not isinstance(secret, bytes | bytearray) or len(secret) == 0:
        raise ConfigError("the ACT secret must be non-empty bytes")
    digest = hmac.new(bytes(secret), user_id.encode("utf-8"), hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "big") >> 1
