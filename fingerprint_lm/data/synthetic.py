"""Procedural captioned images: the embedded default data set (no downloads, any resolution).

Every sample is a coloured, textured shape on a plain or gradient background, with a caption
that describes it and class labels (shape, texture, colour) for the Frechet-distance proxy's
feature classifier. Sample ``i`` depends only on ``(seed, i)``, so a stream is reproducible
whatever the number of DataLoader workers.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from fingerprint_lm.errors import check_int

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "ellipse", "ring", "star", "cross", "diamond")
TEXTURES: tuple[str, ...] = ("plain", "stripes", "checker", "noise", "dots", "gradient")
COLORS: tuple[str, ...] = (
    "red",
    "green",
    "blue",
    "yellow",
    "orange",
    "purple",
    "cyan",
    "magenta",
    "pink",
    "brown",
    "white",
    "gray",
    "black",
)
SIZES: tuple[str, ...] = ("small", "medium", "large")

# sRGB in [0, 1], one row per entry of COLORS.
_RGB = np.array(
    [
        (0.86, 0.12, 0.12),
        (0.15, 0.65, 0.20),
        (0.12, 0.25, 0.85),
        (0.95, 0.85, 0.15),
        (0.97, 0.55, 0.10),
        (0.50, 0.20, 0.65),
        (0.15, 0.80, 0.85),
        (0.85, 0.15, 0.70),
        (0.98, 0.65, 0.75),
        (0.50, 0.30, 0.12),
        (0.96, 0.96, 0.96),
        (0.50, 0.50, 0.50),
        (0.06, 0.06, 0.06),
    ],
    dtype=np.float32,
)

_TEXTURE_PHRASES = {
    "plain": "",
    "stripes": " with stripes",
    "checker": " with a checker pattern",
    "noise": " with a mottled texture",
    "dots": " with dots",
    "gradient": " with a gradient fill",
}


def make_caption(
    shape: str,
    texture: str,
    color: str,
    background: str,
    background_to: str | None = None,
    size: str = "medium",
) -> str:
    """Describe one procedural image in words.

    Parameters:
        shape: one of ``SHAPES``.
        texture: one of ``TEXTURES``.
        color: the shape's colour, one of ``COLORS``.
        background: the background colour (the first colour of a gradient), one of ``COLORS``.
        background_to: the second colour of a gradient background, ``None`` for a plain one.
        size: one of ``SIZES``; "medium" is left out of the caption.

    Returns:
        e.g. ``"a large red circle with stripes on a blue and white gradient background"``.
    """
    for name, value, allowed in (
        ("shape", shape, SHAPES),
        ("texture", texture, TEXTURES),
        ("color", color, COLORS),
        ("background", background, COLORS),
        ("size", size, SIZES),
    ):
        if value not in allowed:
            raise ValueError(f"unknown {name} {value!r}; expected one of {', '.join(allowed)}")
    if background_to is None:
        backdrop = _with_article(f"{background} background")
    else:
        if background_to not in COLORS:
            raise ValueError(f"unknown background_to {background_to!r}; expected one of {', '.join(COLORS)}")
        backdrop = _with_article(f"{background} and {background_to} gradient background")
    size_word = "" if size == "medium" else f"{size} "
    return f"{_with_article(f'{size_word}{color} {shape}')}{_TEXTURE_PHRASES[texture]} on {backdrop}"


def _with_article(phrase: str) -> str:
    return f"{'an' if phrase[0] in 'aeiou' else 'a'} {phrase}"


def _shape_distance(shape: str, u: np.ndarray, v: np.ndarray, r: float, aspect: float) -> np.ndarray:
    """Approximate signed distance (negative inside) to a shape of radius ``r`` centred at 0.

    Exact distances are not needed: only the zero level set and a slope near 1 at the edge
    matter, the latter so that the anti-aliased edge is about one pixel wide.
    """
    if shape == "circle":
        return np.hypot(u, v) - r
    if shape == "square":
        return np.maximum(np.abs(u), np.abs(v)) - r * 0.85
    if shape == "diamond":
        return (np.abs(u) + np.abs(v)) * (1 / math.sqrt(2)) - r * 0.75
    if shape == "ellipse":
        b = r * aspect
        return (np.sqrt((u / r) ** 2 + (v / b) ** 2) - 1.0) * b
    if shape == "ring":
        return np.abs(np.hypot(u, v) - r * 0.72) - r * 0.28
    if shape == "triangle":
        # Equilateral: intersection of three half-planes with outward normals 120 degrees apart.
        d = -v
        for angle in (math.pi / 6, 5 * math.pi / 6):
            d = np.maximum(d, u * math.cos(angle) + v * math.sin(angle))
        return d - r * 0.5
    if shape == "star":
        # Five-pointed star (Inigo Quilez's regular-star distance): fold into one sector, then
        # measure to that sector's edge segment.
        sector = math.pi / 5
        edge = math.pi / 3  # edge angle: 2 = a pentagon's sides, 5 = needle points
        angle = (np.arctan2(u, v) % (2 * sector)) - sector
        rho = np.hypot(u, v)
        px = rho * np.cos(angle) - r * math.cos(sector)
        py = rho * np.abs(np.sin(angle)) - r * math.sin(sector)
        t = np.clip(-(px * math.cos(edge) + py * math.sin(edge)), 0.0, r * math.sin(sector) / math.sin(edge))
        px = px + math.cos(edge) * t
        py = py + math.sin(edge) * t
        return np.hypot(px, py) * np.sign(px)
    if shape == "cross":
        au, av = np.abs(u), np.abs(v)
        w = r * 0.33
        return np.minimum(np.maximum(au - r, av - w), np.maximum(au - w, av - r))
    raise ValueError(f"unknown shape {shape!r}")


def _value_noise(rng: np.random.Generator, x: np.ndarray, y: np.ndarray, cells: int) -> np.ndarray:
    """Smooth noise in [0, 1]: a random ``cells`` x ``cells`` lattice, bilinearly interpolated.

    Defined in image coordinates rather than pixels, so it looks the same at every resolution.
    """
    grid = rng.random((cells + 1, cells + 1), dtype=np.float32)
    gx = (x + 1.0) * (cells / 2.0)
    gy = (y + 1.0) * (cells / 2.0)
    ix = np.clip(gx.astype(np.int64), 0, cells - 1)
    iy = np.clip(gy.astype(np.int64), 0, cells - 1)
    fx = gx - ix
    fy = gy - iy
    top = grid[iy, ix] * (1 - fx) + grid[iy, ix + 1] * fx
    bottom = grid[iy + 1, ix] * (1 - fx) + grid[iy + 1, ix + 1] * fx
    return top * (1 - fy) + bottom * fy


def _texture_pattern(
    texture: str, rng: np.random.Generator, x: np.ndarray, y: np.ndarray, u: np.ndarray, r: float
) -> np.ndarray | None:
    """Where the fill departs from the base colour, in [0, 1]; ``None`` for a plain fill."""
    if texture == "plain":
        return None
    if texture == "stripes":
        angle = rng.uniform(0, math.pi)
        freq = rng.uniform(1.5, 4.0)  # stripes per unit: 3..8 across the image
        t = x * math.cos(angle) + y * math.sin(angle)
        return (np.sin(t * (2 * math.pi * freq)) > 0).astype(np.float32)
    if texture == "checker":
        freq = rng.uniform(1.5, 3.5)
        ox, oy = rng.uniform(0, 1, 2)
        return ((np.floor(x * freq + ox) + np.floor(y * freq + oy)) % 2).astype(np.float32)
    if texture == "dots":
        freq = rng.uniform(2.0, 4.0)
        ox, oy = rng.uniform(0, 1, 2)
        fx = (x * freq + ox) % 1.0 - 0.5
        fy = (y * freq + oy) % 1.0 - 0.5
        return (np.hypot(fx, fy) < rng.uniform(0.22, 0.34)).astype(np.float32)
    if texture == "noise":
        return _value_noise(rng, x, y, int(rng.integers(4, 9)))
    if texture == "gradient":
        # Along the shape's own (rotated) axis, from the base colour on one side to the shade.
        return np.clip(u / (2 * r) + 0.5, 0.0, 1.0)
    raise ValueError(f"unknown texture {texture!r}")


def _shade(rgb: np.ndarray) -> np.ndarray:
    """A contrasting tone of the same hue: darker for light colours, lighter for dark ones."""
    if float(rgb.mean()) > 0.3:
        return rgb * 0.35
    return rgb + (1.0 - rgb) * 0.6


class ProceduralImages(IterableDataset):
    """A seeded stream of captioned procedural images.

    Parameters:
        resolution: side of the square images in pixels; shapes and textures are defined in
            image coordinates, so they scale with it.
        seed: the stream's seed (a non-negative integer). A held-out set is ``length=N`` with
            a seed of its own.
        length: number of samples; ``None`` streams forever.

    Sample ``i`` is generated from a generator seeded by ``(seed, i)``: DataLoader workers take
    every ``num_workers``-th index, so any number of workers yields the same set of samples.
    An infinite stream is additionally split across distributed ranks (each rank trains on
    different images); a finite one is not, so every rank sees the whole held-out set.

    Each sample is ``{"image": FloatTensor[3, H, W] in [-1, 1], "caption": str, "shape": int,
    "texture": int, "color": int}`` with class indices into ``SHAPES``, ``TEXTURES``, ``COLORS``.
    """

    def __init__(self, resolution: int = 32, seed: int = 0, length: int | None = None) -> None:
        super().__init__()
        check_int("image resolution", resolution)
        check_int("data seed", seed, 0)
        if length is not None:
            check_int("data set length", length, 0)
        self.resolution = resolution
        self.seed = seed
        self.length = length
        centres = (np.arange(resolution, dtype=np.float32) + 0.5) * (2.0 / resolution) - 1.0
        # Image coordinates in [-1, 1], y pointing down, shared by every sample.
        self._y, self._x = np.meshgrid(centres, centres, indexing="ij")

    def sample(self, index: int) -> dict:
        """Generate sample ``index`` of this stream (the same one ``__iter__`` yields)."""
        if index < 0 or (self.length is not None and index >= self.length):
            raise IndexError(f"sample {index} out of range for a stream of length {self.length}")
        rng = np.random.default_rng([self.seed, index])
        x, y = self._x, self._y

        shape_id = int(rng.integers(len(SHAPES)))
        texture_id = int(rng.integers(len(TEXTURES)))
        color_id = int(rng.integers(len(COLORS)))
        others = [c for c in range(len(COLORS)) if c != color_id]
        background_id = int(rng.choice(others))
        gradient_background = bool(rng.random() < 0.5)
        background_to_id = int(rng.choice([c for c in others if c != background_id]))

        # Size and position in image coordinates; the centre keeps most of the shape in frame.
        radius = float(rng.uniform(0.25, 0.65))
        size = SIZES[0] if radius < 0.38 else SIZES[2] if radius > 0.52 else SIZES[1]
        margin = 1.0 - radius * 0.8
        cx, cy = rng.uniform(-margin, margin, 2)
        angle = rng.uniform(0, 2 * math.pi)
        cos_a, sin_a = math.cos(angle), math.sin(angle)
        dx, dy = x - cx, y - cy
        u = dx * cos_a + dy * sin_a
        v = -dx * sin_a + dy * cos_a
        aspect = float(rng.uniform(0.45, 0.75))

        pixel = 2.0 / self.resolution
        distance = _shape_distance(SHAPES[shape_id], u, v, radius, aspect)
        mask = np.clip(0.5 - distance / pixel, 0.0, 1.0)[..., None]

        base = np.clip(_RGB[color_id] + rng.normal(0.0, 0.04, 3).astype(np.float32), 0.0, 1.0)
        pattern = _texture_pattern(TEXTURES[texture_id], rng, x, y, u, radius)
        if pattern is None:
            fill = np.broadcast_to(base, (*x.shape, 3))
        else:
            fill = base + pattern[..., None] * (_shade(base) - base)

        if gradient_background:
            bangle = rng.uniform(0, 2 * math.pi)
            t = np.clip((x * math.cos(bangle) + y * math.sin(bangle)) * 0.5 + 0.5, 0.0, 1.0)[..., None]
            background = _RGB[background_id] + t * (_RGB[background_to_id] - _RGB[background_id])
        else:
            background = np.broadcast_to(_RGB[background_id], (*x.shape, 3))

        image = background + mask * (fill - background)
        image = np.ascontiguousarray((image * 2.0 - 1.0).transpose(2, 0, 1), dtype=np.float32)
        caption = make_caption(
            SHAPES[shape_id],
            TEXTURES[texture_id],
            COLORS[color_id],
            COLORS[background_id],
            COLORS[background_to_id] if gradient_background else None,
            size,
        )
        return {
            "image": torch.from_numpy(image),
            "caption": caption,
            "shape": shape_id,
            "texture": texture_id,
            "color": color_id,
        }

    def _shard(self) -> tuple[int, int]:
        """(this reader's first index, index stride) for the current worker and rank."""
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if self.length is not None:
            return worker, workers
        rank, world = 0, 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        return rank * workers + worker, world * workers

    def __iter__(self) -> Iterator[dict]:
        start, stride = self._shard()
        indices = itertools.count(start, stride) if self.length is None else range(start, self.length, stride)
        for index in indices:
            yield self.sample(index)
