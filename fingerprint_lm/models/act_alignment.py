"""The adaptive colluder's maths: undo ACT between copies by matching rows (stream segments first,
in forward order, then the ResnetBlock interiors, :func:`align_to_reference`), and average state
dicts with or without that alignment (:func:`average_state_dicts`, :func:`aligned_average`)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from fingerprint_lm.errors import ConfigError
from fingerprint_lm.models.act import (
    StateDict,
    clone_state_dict,
    find_act_sites,
    site_channels,
    transform_segment,
    transform_site,
)
from fingerprint_lm.models.residual_stream import find_stream_segments


def align_to_reference(
    state_dict: Mapping[str, torch.Tensor],
    reference: Mapping[str, torch.Tensor],
    num_groups: int,
) -> StateDict:
    """The adaptive colluder: reparametrize ``state_dict`` so its channels line up with ``reference``.

    First the residual stream, segment by segment in forward order: each copy channel is matched to
    a reference channel by the |cosine| of the rows of the segment's first writer (``conv_in``, an
    up-sampler conv or a ``conv_shortcut``, whose input columns earlier segments have already
    aligned). Then every ResnetBlock interior, by its conv1 rows (flattened weight and bias).
    Matching is one-to-one (``scipy.optimize.linear_sum_assignment``) at the channel level: the
    colluder does not need to know the groups. The sign of the cosine undoes a sign flip. The scale
    is undone per reference group, by the geometric mean of the matched norm ratios within it: a
    per-group scale is what GroupNorm absorbs, so the aligned copy still computes the copy's
    function whenever the match maps groups to groups (always, for copies that differ only by ACT;
    then all ratios in a group are equal and the reference is recovered exactly). A copy without
    stream ACT aligns its stream to the identity. Tensors no ACT touches are copied unchanged.
    """
    out = clone_state_dict(state_dict)
    try:
        segments = find_stream_segments(reference)
    except ConfigError:  # a decoder the stream walk does not know: it cannot carry stream ACT either
        segments = []
    for segment in segments:
        writer = segment.writers[0]
        perm, sign, scale = _match_rows(_layer_rows(reference, writer), _layer_rows(out, writer), num_groups)
        transform_segment(out, dict(out), segment, perm, sign / scale, sign)
    for site in find_act_sites(reference):
        site_channels(reference, site, num_groups)
        if f"{site}.conv1.weight" not in state_dict:
            raise ConfigError(f"ACT site {site!r} of the reference is not in the copy")
        perm, sign, scale = _match_rows(
            _layer_rows(reference, f"{site}.conv1"), _layer_rows(out, f"{site}.conv1"), num_groups
        )
        transform_site(out, dict(out), site, perm, row_factor=sign / scale, gamma_factor=sign)
    return out


def _match_rows(
    rows_ref: torch.Tensor, rows_copy: torch.Tensor, num_groups: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(perm, sign, scale)`` taking the copy's rows onto the reference's (see align_to_reference)."""
    if rows_ref.shape != rows_copy.shape:
        raise ConfigError(f"copy and reference layer shapes differ: "
                          f"{tuple(rows_copy.shape)} vs {tuple(rows_ref.shape)}")
    channels = rows_ref.shape[0]
    norm_ref = rows_ref.norm(dim=1).clamp_min(1e-300)
    norm_copy = rows_copy.norm(dim=1).clamp_min(1e-300)
    cosine = (rows_ref @ rows_copy.T) / (norm_ref[:, None] * norm_copy[None, :])
    ref_index, copy_index = linear_sum_assignment(-cosine.abs().numpy())
    # ref_index is 0..C-1 in order, so perm[i] is the copy channel matched to reference channel i.
    perm = torch.from_numpy(np.asarray(copy_index, dtype=np.int64))
    matched_cosine = cosine[torch.from_numpy(np.asarray(ref_index, dtype=np.int64)), perm]
    sign = torch.where(matched_cosine < 0, -1.0, 1.0).double()
    log_ratio = torch.log(norm_copy[perm] / norm_ref)
    scale = torch.exp(log_ratio.view(num_groups, -1).mean(dim=1)).repeat_interleave(channels // num_groups)
    return perm, sign, scale


def _layer_rows(state_dict: Mapping[str, torch.Tensor], prefix: str) -> torch.Tensor:
    weight = state_dict[f"{prefix}.weight"].double()
    bias = state_dict[f"{prefix}.bias"].double()
    return torch.cat([weight.reshape(weight.shape[0], -1), bias[:, None]], dim=1)


def average_state_dicts(
    state_dicts: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float] | None = None,
) -> StateDict:
    """The naive colluder: the weighted average of every floating-point tensor.

    ``weights`` (default: equal) are normalised to sum to 1. Non-float tensors (integer buffers)
    are taken from the first state dict. Arithmetic is in float64, stored in each tensor's dtype.
    """
    if len(state_dicts) == 0:
        raise ConfigError("cannot average zero state dicts")
    if weights is None:
        weights = [1.0] * len(state_dicts)
    if len(weights) != len(state_dicts):
        raise ConfigError(f"{len(weights)} weights for {len(state_dicts)} state dicts")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ConfigError(f"averaging weights must be non-negative with a positive sum, got {list(weights)}")
    total = float(sum(weights))
    first = state_dicts[0]
    for other in state_dicts[1:]:
        if other.keys() != first.keys():
            raise ConfigError("cannot average state dicts with different keys")
    out: StateDict = {}
    for key, value in first.items():
        if not value.is_floating_point():
            out[key] = value.detach().clone()
            continue
        acc = torch.zeros(value.shape, dtype=torch.float64)
        for w, sd in zip(weights, state_dicts):
            if sd[key].shape != value.shape:
                raise ConfigError(
                    f"cannot average {key}: shapes {tuple(value.shape)} and {tuple(sd[key].shape)}"
                )
            acc += (w / total) * sd[key].detach().double()
        out[key] = acc.to(value.dtype)
    return out


def aligned_average(
    state_dicts: Sequence[Mapping[str, torch.Tensor]],
    num_groups: int,
    weights: Sequence[float] | None = None,
) -> StateDict:
    """The adaptive colluder's merge: align every copy to the first, then average."""
    if len(state_dicts) == 0:
        raise ConfigError("cannot average zero state dicts")
    reference = state_dicts[0]
    aligned = [clone_state_dict(reference)] + [
        align_to_reference(sd, reference, num_groups) for sd in state_dicts[1:]
    ]
    return average_state_dicts(aligned, weights)
