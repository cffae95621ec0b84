"""The residual stream of a diffusers VAE decoder, cut into segments for stream ACT.

Between two layers that *replace* the hidden state (``conv_in``, an up-sampler's conv, a
ResnetBlock with a ``conv_shortcut``), the decoder's hidden state ``h`` is a residual stream: every
ResnetBlock and attention block reads it and adds to it. Reparametrizing a segment's channels
(permute whole groups and channels within groups, negate or scale whole groups) leaves the decoder's
function unchanged if every layer that touches the segment is rewritten consistently:

- *writers* (their output rows and bias write the stream): ``conv_in``, every ``conv2`` and
  ``conv_shortcut`` ending in the segment, attention ``to_out.0``, an up-sampler's ``conv``;
- *linear readers* (their input columns read the raw stream): ``conv_shortcut`` and an
  up-sampler's ``conv`` that start the next segment;
- *norm readers* (a GroupNorm reads the stream; the layers after it read the normalised stream):
  ResnetBlock ``norm1`` -> ``conv1``, attention ``group_norm`` -> ``to_q``/``to_k``/``to_v``,
  ``conv_norm_out`` -> ``conv_out`` (and the fingerprint's bias map at ``conv_norm_out``).

The walk follows the forward order of diffusers' ``Decoder`` (conv_in, mid block: resnet 0, then
attention i and resnet i + 1, up blocks: resnets then up-sampler, conv_norm_out, conv_out). A
decoder with any other weight-carrying layer raises ``ConfigError`` rather than being transformed
wrongly.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import torch

from fingerprint_lm.errors import ConfigError

DECODER = "decoder"


@dataclass
class StreamSegment:
    """One stretch of the residual stream with a fixed channel count.

    Attributes:
        name: the first writer's prefix, e.g. ``decoder.conv_in``; identifies the segment.
        channels: width of the stream in this segment.
        writers: prefixes of layers whose output rows (weight dim 0) and bias write the stream.
        linear_readers: prefixes of layers whose input columns (weight dim 1) read the raw stream.
        norm_readers: ``(GroupNorm prefix, [prefixes of layers reading its output by columns])``.
    """

    name: str
    channels: int
    writers: list[str] = field(default_factory=list)
    linear_readers: list[str] = field(default_factory=list)
    norm_readers: list[tuple[str, list[str]]] = field(default_factory=list)

    def touched_keys(self) -> set[str]:
        """Every state-dict key a transform of this segment rewrites (without the bias map)."""
        keys = set()
        for prefix in self.writers:
            keys |= {f"{prefix}.weight", f"{prefix}.bias"}
        keys |= {f"{prefix}.weight" for prefix in self.linear_readers}
        for norm, followers in self.norm_readers:
            keys |= {f"{norm}.weight", f"{norm}.bias"} | {f"{f}.weight" for f in followers}
        return keys


def _indices(state_dict: Mapping[str, torch.Tensor], prefix: str) -> list[int]:
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    return sorted({int(m.group(1)) for key in state_dict if (m := pattern.match(key))})


def find_stream_segments(state_dict: Mapping[str, torch.Tensor]) -> list[StreamSegment]:
    """The decoder's residual-stream segments, in forward order (see the module docstring).

    The walk depends only on the keys and shapes, which every copy of one model shares, so it is
    memoised on them: issuing a copy walks the decoder once, not twice per copy (about a quarter
    of a tiny-VAE copy's cost). Callers get fresh lists they may change."""
    signature = tuple((key, tuple(value.shape)) for key, value in state_dict.items())
    return [
        replace(seg, writers=list(seg.writers), linear_readers=list(seg.linear_readers),
                norm_readers=[(norm, list(followers)) for norm, followers in seg.norm_readers])
        for seg in _segments_of(signature)
    ]


@functools.lru_cache(maxsize=8)
def _segments_of(signature: tuple[tuple[str, tuple[int, ...]], ...]) -> tuple[StreamSegment, ...]:
    # The walk reads only ``key in state_dict`` and ``state_dict[key].shape``: meta tensors carry both.
    return tuple(_walk_segments({key: torch.empty(shape, device="meta") for key, shape in signature}))


def _walk_segments(state_dict: Mapping[str, torch.Tensor]) -> list[StreamSegment]:
    if f"{DECODER}.conv_in.weight" not in state_dict:
        raise ConfigError("stream ACT needs a diffusers VAE state dict with decoder.conv_in")
    covered: set[str] = set()

    def has(prefix: str) -> bool:
        return f"{prefix}.weight" in state_dict

    def new_segment(writer: str) -> StreamSegment:
        segment = StreamSegment(writer, int(state_dict[f"{writer}.weight"].shape[0]), writers=[writer])
        segments.append(segment)
        return segment

    def resnet(segment: StreamSegment, prefix: str) -> StreamSegment:
        if has(f"{prefix}.time_emb_proj"):
            raise ConfigError(f"stream ACT: {prefix} has a time embedding; not a VAE decoder block")
        segment.norm_readers.append((f"{prefix}.norm1", [f"{prefix}.conv1"]))
        covered.update({f"{prefix}.norm1", f"{prefix}.conv1", f"{prefix}.norm2", f"{prefix}.conv2"})
        if has(f"{prefix}.conv_shortcut"):
            segment.linear_readers.append(f"{prefix}.conv_shortcut")
            covered.add(f"{prefix}.conv_shortcut")
            segment = new_segment(f"{prefix}.conv_shortcut")
        segment.writers.append(f"{prefix}.conv2")
        return segment

    def attention(segment: StreamSegment, prefix: str) -> None:
        projections = [f"{prefix}.to_q", f"{prefix}.to_k", f"{prefix}.to_v"]
        segment.norm_readers.append((f"{prefix}.group_norm", projections))
        segment.writers.append(f"{prefix}.to_out.0")
        covered.update({f"{prefix}.group_norm", *projections, f"{prefix}.to_out.0"})

    segments: list[StreamSegment] = []
    segment = new_segment(f"{DECODER}.conv_in")
    covered.add(f"{DECODER}.conv_in")
    mid = f"{DECODER}.mid_block"
    mid_resnets = _indices(state_dict, f"{mid}.resnets")
    mid_attentions = _indices(state_dict, f"{mid}.attentions")
    if mid_resnets:
        segment = resnet(segment, f"{mid}.resnets.{mid_resnets[0]}")
        for i, index in enumerate(mid_resnets[1:]):
            if i < len(mid_attentions):
                attention(segment, f"{mid}.attentions.{mid_attentions[i]}")
            segment = resnet(segment, f"{mid}.resnets.{index}")
    for block in _indices(state_dict, f"{DECODER}.up_blocks"):
        prefix = f"{DECODER}.up_blocks.{block}"
        for index in _indices(state_dict, f"{prefix}.resnets"):
            segment = resnet(segment, f"{prefix}.resnets.{index}")
        for index in _indices(state_dict, f"{prefix}.upsamplers"):
            upsampler = f"{prefix}.upsamplers.{index}.conv"
            segment.linear_readers.append(upsampler)
            covered.add(upsampler)
            segment = new_segment(upsampler)
    if not has(f"{DECODER}.conv_norm_out") or not has(f"{DECODER}.conv_out"):
        raise ConfigError("stream ACT needs decoder.conv_norm_out and decoder.conv_out")
    segment.norm_readers.append((f"{DECODER}.conv_norm_out", [f"{DECODER}.conv_out"]))
    covered.update({f"{DECODER}.conv_norm_out", f"{DECODER}.conv_out"})

    # Refuse decoders with layers this walk does not know (they would be left inconsistent).
    for key in state_dict:
        if key.startswith(f"{DECODER}.") and key.endswith(".weight") and key[: -len(".weight")] not in covered:
            raise ConfigError(f"stream ACT does not know the decoder layer {key[: -len('.weight')]!r}")
    for seg in segments:
        widths = {int(state_dict[f"{w}.weight"].shape[0]) for w in seg.writers}
        if widths != {seg.channels}:
            raise ConfigError(f"stream segment {seg.name}: writers of widths {sorted(widths)}")
    return segments
