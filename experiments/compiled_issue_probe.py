"""Issue 14, can issuing a pnm copy be 10^4x cheaper than a stable_signature copy on the tiny
decoder? A compiled issuance, measured and not shipped.

``methods.base.personal_tensors`` (the shipped path) runs the mapping network's heads one by one,
modulates the decoder's tensors one by one, then rewrites each of them once more per ACT site and
stream segment (``models.act.apply_act``): a few hundred small tensor operations, which on the
tiny decoder cost more than the arithmetic (``make bench``: 5.4 ms a copy against 7.7 s for a
stable_signature copy, a ratio of 1432; 10^4 needs 0.77 ms).

Yet a copy is a gather with factors. Element ``(row, col, k)`` of a copy's weight is element
``(perm_row[row], perm_col[col], k)`` of the base weight, times the modulation of that source
element (``1 + scale`` of a GroupNorm row, ``1 + in_scale`` of a conv column; ``+ shift`` for a
GroupNorm bias), times a row factor and a column factor, each ``sign * scale``, its inverse,
``sign`` or 1 of one ACT channel space (an interior site or a stream segment; which layer takes
which is ``models.act``'s table). A :class:`CopyPlan` records for every ``(row, col)`` pair of
every decoder tensor its spaces, factor kinds and modulation slots, once. Per user it runs the
mapping network with every head fused into one matrix, draws ACT with the shipped draw
(``models.act.draw_raw``: one seed, the same transformation), and gathers the pairs of each
kernel size with one ``index_select``.

Its copies equal the shipped path's to float32 rounding (the shipped path rounds after the
modulation and after each ACT space, the plan multiplies each weight by one combined factor);
``main`` checks every ACT type and scope of the three shipped checkpoints, then times both paths
and the plan's steps: ``results/compiled_issue_probe.md``.
"""

from __future__ import annotations

import argparse
import time
import weakref
from dataclasses import dataclass

import numpy as np
import torch
from torch._utils import _unflatten_dense_tensors  # DDP's bucket unflatten: views of one buffer, in C++

from fingerprint_lm.bench import _method_models
from fingerprint_lm.errors import ConfigError, check_int, exit_on_user_error
from fingerprint_lm.methods.base import personal_tensors
from fingerprint_lm.models.act import STREAM_PREFIX, act_spaces, check_scale_range, draw_raw, log_uniform
from fingerprint_lm.models.residual_stream import find_stream_segments

ONE, FACTOR, INVERSE, SIGN = range(4)  # what an axis is multiplied by: 1, sign * scale, its inverse, sign


class PlanUnsupported(Exception):
    """The model has something the plan does not compile: issue through the shipped path."""


@dataclass
class _Group:
    """The pairs of every planned tensor with one kernel size ``rest``, as rows of ``base``."""

    base: torch.Tensor  # [pairs, rest] float32: the base tensors, flattened to (row, col) pairs
    start: int  # offset of the group in the output buffer
    source_base: torch.Tensor  # [pairs] int64: the tensor's first pair
    row_stride: torch.Tensor  # [pairs] int64: pairs per row (the tensor's column count)
    row_key: torch.Tensor  # [pairs] int64: index of the pair's row into the permutation table
    col_key: torch.Tensor
    row_factor: torch.Tensor  # [pairs] int64: index of the pair's row factor into the factor table
    col_factor: torch.Tensor
    mod_mul: torch.Tensor | None  # [pairs] int64 into 1 + modulation (0: none), by *source* pair
    mod_add: torch.Tensor | None  # [pairs] int64 into the modulation for GroupNorm biases (0: none)


class CopyPlan:
    """The compiled ``code -> copy tensors`` of one model, ACT type, scale range and scope.

    Build with :func:`copy_plan` (cached per model, rebuilt when a weight changes); call
    :meth:`tensors` per user. Raises :class:`PlanUnsupported` for models it does not compile.
    """

    def __init__(self, model, act_type: str, scale_range: tuple[float, float], act_scope: str):
        pnm = model.pnm
        if pnm.kernel_site_names:
            raise PlanUnsupported("per-user kernels")
        state = {key: value.detach() for key, value in model.vae.state_dict().items()}
        if any(value.dtype != torch.float32 or value.device.type != "cpu" for value in state.values()):
            raise PlanUnsupported("weights not float32 on the CPU")
        self.pnm, self.act_type = pnm, act_type
        self.scale_range = scale_range if act_type == "none" else check_scale_range(scale_range)
        self.num_groups = int(model.vae.config.norm_num_groups)
        spaces = [] if act_type == "none" else act_spaces(state, self.num_groups, act_scope)
        self.space_channels = [channels for _, channels in spaces]
        roles, self.bias_map_space = self._act_roles(state, spaces)
        modulation, self._heads = self._modulation_roles(state)
        planned = [key for key in state if key in roles or key in modulation]
        self._build_groups(state, planned, roles, modulation)
        self.keys = list(state)

    # -- build ------------------------------------------------------------------------------------
    def _act_roles(self, state, spaces) -> tuple[dict[str, dict[str, tuple[int, int]]], int | None]:
        """``{key: {"row" | "col": (space, factor kind)}}`` for every tensor ACT rewrites."""
        roles: dict[str, dict[str, tuple[int, int]]] = {}
        bias_map_space = None
        site = None if self.pnm.spatial_site_name is None else f"decoder.{self.pnm.spatial_site_name}"

        def claim(key: str, axis: str, space: int, kind: int) -> None:
            if axis in roles.setdefault(key, {}):  # two spaces on one axis: apply_act composes them
                raise PlanUnsupported(f"{key}: two ACT spaces on its {axis}s")
            roles[key][axis] = (space, kind)

        segments = {seg.name: seg for seg in find_stream_segments(state)} if any(
            name.startswith(STREAM_PREFIX) for name, _ in spaces) else {}
        for space, (name, _) in enumerate(spaces):
            if not name.startswith(STREAM_PREFIX):  # an interior site: conv1 rows .. conv2 columns
                for suffix, axis, kind in (("conv1.weight", "row", FACTOR), ("conv1.bias", "row", FACTOR),
                                           ("norm2.weight", "row", SIGN), ("norm2.bias", "row", ONE),
                                           ("conv2.weight", "col", ONE)):
                    claim(f"{name}.{suffix}", axis, space, kind)
                continue
            segment = segments[name[len(STREAM_PREFIX):]]
            for prefix in segment.writers:
                claim(f"{prefix}.weight", "row", space, FACTOR)
                claim(f"{prefix}.bias", "row", space, FACTOR)
            for prefix in segment.linear_readers:
                claim(f"{prefix}.weight", "col", space, INVERSE)
            for norm, followers in segment.norm_readers:
                claim(f"{norm}.weight", "row", space, SIGN)
                claim(f"{norm}.bias", "row", space, ONE)
                for prefix in followers:
                    claim(f"{prefix}.weight", "col", space, ONE)
                if norm == site:
                    bias_map_space = space
        return roles, bias_map_space

    def _modulation_roles(self, state) -> tuple[dict[str, tuple[str, int]], tuple[torch.Tensor, torch.Tensor]]:
        """``{key: ("row_mul" | "row_add" | "col_mul", offset into the fused heads' output)}``
        and the fused heads ``(weight, bias)``: every head's rows, in :meth:`modulation`'s order."""
        roles: dict[str, tuple[str, int]] = {}
        weights, biases, offset = [], [], 0
        for name in self.pnm.affine_site_names:
            head = self.pnm.affine_heads[name.replace(".", "__")]
            channels = head.out_features // 2
            roles[f"decoder.{name}.weight"] = ("row_mul", offset)  # scale, then shift: chunk(2)
            roles[f"decoder.{name}.bias"] = ("row_add", offset + channels)
            weights.append(head.weight)
            biases.append(head.bias)
            offset += head.out_features
        for name in self.pnm.conv_site_names:
            head = self.pnm.conv_heads[name.replace(".", "__")]
            roles[f"decoder.{name}.weight"] = ("col_mul", offset)
            weights.append(head.weight)
            biases.append(head.bias)
            offset += head.out_features
        if not weights:
            return roles, (torch.zeros(0, self.pnm.mapping.net[-2].out_features), torch.zeros(0))
        return roles, (torch.cat(weights).detach().clone(), torch.cat(biases).detach().clone())

    def _build_groups(self, state, planned: list[str], roles, modulation) -> None:
        widths = ([int(v.shape[0]) for v in state.values() if v.dim()]
                  + [int(v.shape[1]) for v in state.values() if v.dim() > 1])
        self.identity = torch.arange(max(widths, default=1))
        space_base = [len(self.identity) + sum(self.space_channels[:s]) for s in range(len(self.space_channels))]
        space_groups = len(self.space_channels) * self.num_groups
        by_rest: dict[int, list[str]] = {}
        for key in planned:
            value = state[key]
            if value.dim() not in (1, 2, 4) or (value.dim() == 1 and "col" in roles.get(key, {})):
                raise PlanUnsupported(f"{key}: shape {tuple(value.shape)}")
            by_rest.setdefault(int(value[0, 0].numel()) if value.dim() > 1 else 1, []).append(key)

        def axis_keys(role: tuple[int, int] | None, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            """The axis' keys into the permutation table and the group-level factor table
            ``[1, sign * scale, 1 / (sign * scale), sign]`` (factors are constant within a group)."""
            if role is None:
                return index, torch.zeros_like(index)  # identity permutation, factor 1
            space, kind = role
            if kind == ONE:
                return space_base[space] + index, torch.zeros_like(index)
            group = space * self.num_groups + index // (self.space_channels[space] // self.num_groups)
            return space_base[space] + index, 1 + (kind - 1) * space_groups + group

        self.groups, self.placement, start = [], {}, 0
        for rest, keys in sorted(by_rest.items()):
            columns: dict[str, list[torch.Tensor]] = {name: [] for name in _GROUP_INDICES}
            pairs = 0
            for key in keys:
                value = state[key]
                rows, cols = int(value.shape[0]), int(value.shape[1]) if value.dim() > 1 else 1
                row, col = torch.arange(rows).repeat_interleave(cols), torch.arange(cols).repeat(rows)
                row_key, row_factor = axis_keys(roles.get(key, {}).get("row"), row)
                col_key, col_factor = axis_keys(roles.get(key, {}).get("col"), col)
                kind, offset = modulation.get(key, (None, 0))
                none = torch.zeros(rows * cols, dtype=torch.long)
                mod_index = 1 + offset + (col if kind == "col_mul" else row)
                for name, values in (("source_base", torch.full_like(none, pairs)),
                                     ("row_stride", torch.full_like(none, cols)),
                                     ("row_key", row_key), ("col_key", col_key), ("row_factor", row_factor),
                                     ("col_factor", col_factor),
                                     ("mod_mul", mod_index if kind in ("row_mul", "col_mul") else none),
                                     ("mod_add", mod_index if kind == "row_add" else none)):
                    columns[name].append(values)
                self.placement[key] = (start + pairs * rest, value.shape)
                pairs += rows * cols
            index = {name: torch.cat(parts) for name, parts in columns.items()}
            self.groups.append(_Group(
                base=torch.cat([state[key].reshape(-1, rest) for key in keys]).clone(), start=start,
                **{name: index[name] for name in _GROUP_INDICES[:6]},
                mod_mul=index["mod_mul"] if index["mod_mul"].any() else None,
                mod_add=index["mod_add"] if index["mod_add"].any() else None,
            ))
            start += pairs * rest
        others = [key for key in state if key not in self.placement]
        self.others = torch.cat([state[key].reshape(-1) for key in others]).clone() if others else torch.zeros(0)
        for key in others:
            self.placement[key] = (start, state[key].shape)
            start += state[key].numel()
        self.others_start, self.total = start - self.others.numel(), start
        # the output buffer's tensors in buffer order, as templates for one C++ unflatten call
        self._buffer_order = sorted(self.placement, key=lambda key: self.placement[key][0])
        self._templates = [torch.empty(self.placement[key][1], device="meta") for key in self._buffer_order]

    # -- per user ---------------------------------------------------------------------------------
    @torch.no_grad()
    def tensors(self, bits, act_seed: int | None) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """One user's copy: ``(vae_state_dict, bias_map)`` (None without a spatial site), every
        tensor a view of one fresh buffer."""
        code = torch.as_tensor(bits).long().reshape(1, -1)
        self.pnm.check_code(code)
        signs = code.to(self.pnm.mapping.net[0].weight.dtype) * 2 - 1
        weight, bias = self._heads
        values = self.pnm._bounded(torch.addmm(bias, self.pnm.mapping(signs), weight.t()))[0]
        multiplier = torch.cat([values.new_zeros(1), values]).double().add_(1.0)
        shift = torch.cat([values.new_zeros(1), values])
        perms, factors = self._draw(act_seed)
        out = torch.empty(self.total)
        for group in self.groups:
            target = out[group.start : group.start + group.base.numel()].view_as(group.base)
            source = group.base if group.mod_add is None else group.base + shift[group.mod_add][:, None]
            index, factor = None, None
            if perms is not None:
                index = group.source_base + perms[group.row_key] * group.row_stride + perms[group.col_key]
                factor = factors[group.row_factor] * factors[group.col_factor]
                torch.index_select(source, 0, index, out=target)
            else:
                target.copy_(source)
            if group.mod_mul is not None:
                scale = multiplier[group.mod_mul if index is None else group.mod_mul[index]]
                factor = scale if factor is None else factor.mul_(scale)
            if factor is not None:
                target.mul_(factor.float()[:, None])
        out[self.others_start :].copy_(self.others)
        # one C++ call for the ~150 views: a Python loop of .view() cost a third of a copy
        views = dict(zip(self._buffer_order, _unflatten_dense_tensors(out, self._templates), strict=True))
        state = {key: views[key] for key in self.keys}
        return state, self._bias_map(signs, perms)

    def _draw(self, act_seed: int | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The user's ACT as a permutation table (identity, then each space's local permutation)
        and the group-level factor table ``[1, sign * scale, 1 / (sign * scale), sign]``: the
        draws of :func:`~fingerprint_lm.models.act.draw_act`, one generator in one order."""
        if not self.space_channels:
            return None, None
        generator = torch.Generator().manual_seed(int(act_seed))
        raw = [draw_raw(channels, self.num_groups, self.act_type, generator) for channels in self.space_channels]
        groups = len(raw) * self.num_groups
        sign = (torch.ones(groups, dtype=torch.float64) if raw[0][1] is None
                else torch.cat([r[1] for r in raw]).double() * 2 - 1)
        scale = torch.ones(groups, dtype=torch.float64) if raw[0][2] is None else log_uniform(
            torch.cat([r[2] for r in raw]), *self.scale_range)
        factor = sign * scale
        return (torch.cat([self.identity, *(r[0] for r in raw)]),
                torch.cat([sign.new_ones(1), factor, 1.0 / factor, sign]))

    def _bias_map(self, signs: torch.Tensor, perms: torch.Tensor | None) -> torch.Tensor | None:
        """The carrier's bias map (``PersonalizedDecoder.modulation``'s), its channels permuted with
        the stream segment that ends at its GroupNorm."""
        if self.pnm.spatial_site_name is None:
            return None
        amplitude = self.pnm.carrier_log_amplitude.exp()
        bias_map = torch.einsum("bk,k,kchw->bchw", signs, amplitude, self.pnm.carriers)
        if self.bias_map_space is not None and perms is not None:
            start = len(self.identity) + sum(self.space_channels[: self.bias_map_space])
            bias_map = bias_map[:, perms[start : start + self.space_channels[self.bias_map_space]]]
        return bias_map.contiguous()


_GROUP_INDICES = ("source_base", "row_stride", "row_key", "col_key", "row_factor", "col_factor", "mod_mul", "mod_add")
# model.pnm -> {"watched": [...], settings: (token, plan)}
_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def copy_plan(model, act_type: str, scale_range: tuple[float, float], act_scope: str) -> CopyPlan | None:
    """The model's :class:`CopyPlan` for these ACT settings (None: issue through the shipped
    path), built once and rebuilt when a weight it read changed in place or moved (its version
    counter or storage changed). Replacing a module's parameter object is not noticed: load
    weights into a model with ``load_state_dict``, as everything here does."""
    settings = (act_type, tuple(float(v) for v in scale_range), act_scope)
    plans = _PLANS.setdefault(model.pnm, {})
    if "watched" not in plans:
        plans["watched"] = [*model.vae.parameters(), *model.vae.buffers(), *model.pnm.parameters()]
    token = [(t._version, t.data_ptr()) for t in plans["watched"]]
    if settings in plans and plans[settings][0] == token:
        return plans[settings][1]
    try:
        plan = CopyPlan(model, act_type, settings[1], act_scope)
    except PlanUnsupported:
        plan = None
    plans[settings] = (token, plan)
    return plan


# -- the measurement ------------------------------------------------------------------------------
def _max_relative_difference(model, act_type: str, scope: str) -> float:
    code = np.random.default_rng(1).integers(0, 2, model.fingerprint_bits, dtype=np.uint8)
    plan = copy_plan(model, act_type, (0.25, 4.0), scope)
    if plan is None:
        raise ConfigError(f"the plan does not compile the {model.method} checkpoint")
    compiled, bias_map = plan.tensors(code, 11)
    reference, reference_map, _ = personal_tensors(model, code, act_type, 11, act_scope=scope)
    if list(compiled) != list(reference) or (bias_map is None) != (reference_map is None):
        raise ConfigError(f"{model.method} {act_type} {scope}: the plan's copy has other tensors")
    worst = 0.0
    for key, value in reference.items():
        if value.numel():
            scale = max(value.abs().max().item(), 1e-30)
            worst = max(worst, (compiled[key] - value).abs().max().item() / scale)
    if bias_map is not None:
        worst = max(worst, (bias_map - reference_map).abs().max().item())
    return worst


def _seconds(fn, repeats: int) -> float:
    for _ in range(3):
        fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200, help="copies timed per path (> 0)")
    parser.add_argument("--signature-repeats", type=int, default=2,
                        help="stable_signature copies timed (0: skip them)")
    args = parser.parse_args()
    check_int("--repeats", args.repeats)
    check_int("--signature-repeats", args.signature_repeats, 0)
    torch.set_num_threads(2)
    models = _method_models()
    lines = ["| checkpoint | worst relative difference over 5 ACT types x 3 scopes | shipped path ms | compiled ms "
             "| speed-up |",
             "|---|---|---|---|---|"]
    rng = np.random.default_rng(0)
    timings = {}
    for name in ("pnm", "carrier", "wouaf"):
        model = models[name]
        worst = max(_max_relative_difference(model, act, scope) for act in ("none", "permute", "sign", "scale", "all")
                    for scope in ("stream", "interior", "both"))
        plan = copy_plan(model, "all", (0.25, 4.0), "stream")

        def shipped_copy(model=model):  # a new code and seed each time: nothing memoised
            return personal_tensors(model, rng.integers(0, 2, 48, dtype=np.uint8), "all", int(rng.integers(2**31)))

        def compiled_copy(plan=plan):
            return plan.tensors(rng.integers(0, 2, 48, dtype=np.uint8), int(rng.integers(2**31)))

        shipped, compiled = _seconds(shipped_copy, args.repeats), _seconds(compiled_copy, args.repeats)
        timings[name] = (shipped, compiled)
        lines.append(f"| {name} | {worst:.2e} | {shipped * 1e3:.2f} | {compiled * 1e3:.2f} | "
                     f"{shipped / compiled:.2f}x |")
    if args.signature_repeats:
        signature = models["stable_signature"]
        seconds = _seconds(lambda: personal_tensors(signature, rng.integers(0, 2, 48, dtype=np.uint8), "all", 1),
                           args.signature_repeats)
        lines += ["", f"stable_signature copy: {seconds:.2f} s; ratio to pnm: {seconds / timings['pnm'][0]:.0f} "
                  f"(shipped path), {seconds / timings['pnm'][1]:.0f} (compiled); 10^4 needs "
                  f"{seconds / 1e4 * 1e3:.2f} ms a pnm copy"]
    lines += ["", f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
                  f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"]
    print("\n".join(lines))


if __name__ == "__main__":
    exit_on_user_error(main)
