"""Text-to-image evaluation: a local Stable Diffusion folder with a user's copy as its VAE.

``python -m fingerprint_lm task=text2image_eval user_id=alice text2image.pipeline_path=/models/sd2``
(docs/distributor.md, "Text-to-image evaluation"):

1. ``StableDiffusionPipeline.from_pretrained(<local folder>, vae=<the user's copy>)``; the copy is
   loaded with :func:`~fingerprint_lm.distributor.copies.load_copy` (checked against the hash the
   registry holds for the user), so its bias map is part of the decoder. Nothing is downloaded.
2. Prompts are the first caption of each of the first ``n_images`` COCO images (ordered by id).
   Image ``i`` starts from noise drawn by a CPU ``torch.Generator`` seeded with ``seed + i``: every
   copy, every batch size and CPU or CUDA start from the same latents, so runs and copies compare.
3. The denoised latents are decoded by the copy, and by the pipeline's own VAE as a control, then
   written as 8-bit PNGs; bits are read from exactly those 8-bit pixels.
4. Scores: bit accuracy against the user's registered code, attribution over the whole registry
   (:func:`~fingerprint_lm.distributor.attribution.attribute_images`), PSNR of the copy's images
   against the base VAE's, and a Frechet distance to the COCO images: real FID through clean-fid
   where it is installed with its weights, else ``fid_proxy`` (never called FID), else skipped
   with the reason written down.

Why the pipeline stops at the latents (``output_type="latent"``) and this module decodes: the
UNet, the expensive part, then runs once per prompt for two decoders, so the copy's images and the
control images share their latents (a paired comparison: PSNR of the mark alone, false accusations
on unmarked images, the FID cost of the fingerprint alone); and the decoders run in float32 whatever
the UNet's precision (a half-precision SD VAE overflows, hence diffusers' ``force_upcast``, and
ACT's group scales up to 4x make that likelier). The copy is still what the pipeline holds as its
``vae``; ``pipe(prompt, output_type="pil")`` gives the same pixels in float32 (tested).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.nn import functional as F
from tqdm.auto import tqdm

from fingerprint_lm.data.coco import CocoCaptions
from fingerprint_lm.distributor.attribution import attribute_images
from fingerprint_lm.errors import ConfigError, check_int
from fingerprint_lm.evaluation.sd_pipeline import decode_to_pixels, generate_latents
from fingerprint_lm.metrics.fid import clean_fid, frechet_distance_proxy
from fingerprint_lm.metrics.quality import psnr
from fingerprint_lm.pixels import from_uint8, to_uint8

log = logging.getLogger(__name__)

FID_MODES: tuple[str, ...] = ("auto", "clean", "proxy", "off")
DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
METRICS_NAME = "text2image_metrics.json"
GRID_NAME = "text2image_grid.png"
# Subfolders of <output_dir>/images: the copy's images, the control, the COCO reference (clean-fid).
COPY_IMAGES, BASE_IMAGES, REFERENCE_IMAGES = "copy", "base", "reference"


# -- settings -------------------------------------------------------------------------------------
def resolve_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """The UNet's and text encoder's dtype: ``auto`` is float16 on CUDA and float32 on CPU; half
    types only on CUDA (CPU kernels for them are slow or missing). Decoders always run in float32."""
    name = str(name or "auto")
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ConfigError(f"text2image.dtype must be auto or one of {', '.join(DTYPES)}, got {name!r}")
    if DTYPES[name] != torch.float32 and device.type != "cuda":
        raise ConfigError(f"text2image.dtype={name} needs a CUDA device (on CPU use float32 or auto)")
    return DTYPES[name]


def choose_fid_mode(
    requested: str, n_images: int, min_images: int, clean_available: bool
) -> tuple[str, str | None]:
    """``(mode, reason)``: the Frechet distance to compute (``clean``, ``proxy`` or ``off``) and,
    when it is not clean-fid, why. ``requested=clean`` without clean-fid is a ConfigError (asked
    for explicitly); too few images turn any mode off (the distance's small-sample bias would
    dominate it), with the reason recorded."""
    if requested not in FID_MODES:
        raise ConfigError(f"text2image.fid must be one of {', '.join(FID_MODES)}, got {requested!r}")
    check_int("text2image.fid_min_images", min_images, 2)
    if requested == "clean" and not clean_available:
        raise ConfigError(
            "text2image.fid=clean but clean-fid is not available: install the [fid] extra and put the "
            "Inception weights in $FINGERPRINT_LM_INCEPTION_DIR (or use fid=auto / proxy / off)"
        )
    if requested == "off":
        return "off", "disabled (text2image.fid=off)"
    if n_images < min_images:
        return "off", (
            f"{n_images} images < text2image.fid_min_images={min_images}: a Frechet distance on so few "
            "images measures its own small-sample bias"
        )
    if requested == "auto" and not clean_available:
        return "proxy", (
            "clean-fid not available (install the [fid] extra and the Inception weights): fid_proxy "
            "instead, a small offline feature net trained on procedural images; not comparable with FID"
        )
    if requested == "proxy":
        return "proxy", "fid_proxy requested: not comparable with FID"
    return "clean", None


# -- images ------------------------------------------------------------------------------------
def write_grid(rows: Sequence[np.ndarray], path: str | Path, gap: int = 2) -> Path:
    """One PNG of image rows (each ``uint8 [n, H, W, 3]``, same n), separated by white gaps."""
    n, height, width, _ = rows[0].shape
    grid = np.full(
        (len(rows) * height + (len(rows) - 1) * gap, n * width + (n - 1) * gap, 3), 255, dtype=np.uint8
    )
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            top, left = r * (height + gap), c * (width + gap)
            grid[top : top + height, left : left + width] = image
    path = Path(path)
    Image.fromarray(grid, "RGB").save(path)
    return path


def _save_png(pixels: np.ndarray, path: Path) -> None:
    Image.fromarray(np.ascontiguousarray(pixels), "RGB").save(path)


def _resize(images: torch.Tensor, side: int) -> torch.Tensor:
    if images.shape[-1] == side and images.shape[-2] == side:
        return images
    return F.interpolate(images, size=(side, side), mode="bilinear", antialias=True, align_corners=False)


def _bit_accuracy(bits: str, code: np.ndarray) -> float:
    extracted = np.frombuffer(bits.encode("ascii"), dtype=np.uint8) - ord("0")
    return float((extracted == np.asarray(code, dtype=np.uint8)).mean())


# -- the evaluation -------------------------------------------------------------------------------
def image_seed(seed: int, index: int) -> int:
    """Seed of the starting noise of caption ``index``: the same for every copy and batch size."""
    return int(seed) + int(index)


@dataclass
class _Collected:
    """What the batches of :func:`evaluate_text2image` add up to."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    grid: dict[str, list[np.ndarray]] = field(default_factory=lambda: {"base": [], "copy": []})
    proxy: dict[str, list[torch.Tensor]] = field(default_factory=lambda: {"copy": [], "base": []})
    match_threshold: int | None = None


def _score_batch(batch, decoded: dict[str, np.ndarray], owner: CopyOwner, images_dir: Path,
                 seed: int) -> tuple[list[dict[str, Any]], int | None]:
    """Save one batch's PNGs and read them: one row per image (copy, and the control if decoded)."""
    extractor, index, code, fpr = owner.extractor, owner.index, owner.code, owner.fpr
    tensors = {name: from_uint8(pixels) for name, pixels in decoded.items()}
    names = [f"{i:05d}.png" for i, _ in batch]
    verdicts = {name: attribute_images(extractor, index, list(zip(names, tensors[name])), fpr=fpr,
                                       decoding=owner.decoding, screen_pass_rate=owner.screen_pass_rate)
                for name in decoded}
    quality = psnr(tensors["copy"], tensors["base"]).tolist() if "base" in decoded else None
    rows = []
    for j, (i, caption) in enumerate(batch):
        _save_png(decoded["copy"][j], images_dir / COPY_IMAGES / names[j])
        verdict = verdicts["copy"]["images"][j]
        row = {
            "index": i,
            "caption": caption,
            "seed": image_seed(seed, i),
            "file": f"{COPY_IMAGES}/{names[j]}",
            "bits": verdict["bits"],
            "bit_acc": _bit_accuracy(verdict["bits"], code),
            "accused_user": verdict["user_id"],
            "nearest_user_id": verdict["nearest_user_id"],
            "matching_bits": verdict["matching_bits"],
            "p_value": verdict["p_value"],
        }
        if quality is not None:
            _save_png(decoded["base"][j], images_dir / BASE_IMAGES / names[j])
            control = verdicts["base"]["images"][j]
            row.update(
                base_file=f"{BASE_IMAGES}/{names[j]}",
                base_bit_acc=_bit_accuracy(control["bits"], code),
                base_accused_user=control["user_id"],
                psnr_vs_base=float(quality[j]),
            )
        rows.append(row)
    return rows, verdicts["copy"]["match_threshold"]


def _summary(collected: _Collected, user_id: str, seconds: float, has_base: bool) -> dict[str, Any]:
    rows = collected.rows
    n = len(rows)
    summary: dict[str, Any] = {
        "n_images": n,
        "bit_acc": float(np.mean([r["bit_acc"] for r in rows])),
        "bit_acc_min": float(min(r["bit_acc"] for r in rows)),
        "attributed_rate": sum(r["accused_user"] == user_id for r in rows) / n,
        "misattributed": sum(r["accused_user"] not in (None, user_id) for r in rows),
        "match_threshold": collected.match_threshold,
        "seconds": seconds,
        "images_per_second": n / seconds if seconds > 0 else None,
    }
    if has_base:
        summary.update(
            bit_acc_base=float(np.mean([r["base_bit_acc"] for r in rows])),
            base_accused_rate=sum(r["base_accused_user"] is not None for r in rows) / n,
            psnr_vs_base=float(np.mean([r["psnr_vs_base"] for r in rows])),
        )
    return summary


@dataclass(frozen=True, eq=False)  # holds arrays and modules: compared by identity
class CopyOwner:
    """Whose copy is evaluated, and how the distributor reads its images: the extractor (CPU) and
    the registry's ``CodeIndex``, attribution at ``fpr`` with ``decoding`` (``soft`` | ``hard``;
    distributor/attribution.py) and, for a registry of screened codes, its ``screen_pass_rate``."""

    user_id: str
    code: np.ndarray
    extractor: torch.nn.Module
    index: Any
    fpr: float = 1e-6
    decoding: str = "soft"
    screen_pass_rate: float | None = None


@dataclass(frozen=True)
class Generation:
    """How the images are made: ``resolution`` px, the sampler's steps and guidance, ``seed`` (with
    the COCO index, each image's seed), ``batch_size`` prompts at a time; ``grid_images`` per row
    of the grid; ``proxy_side``: when set, every image is also kept at that side (fid_proxy)."""

    resolution: int
    num_inference_steps: int
    guidance_scale: float
    seed: int
    batch_size: int = 4
    grid_images: int = 8
    proxy_side: int | None = None
    progress: bool = True


@dataclass
class Text2ImageResult:
    """Per-image rows (``file`` / ``base_file`` relative to the images folder), the summary, the
    grid's rows (base, copy; uint8) and, for fid_proxy, the images at the proxy's side."""

    images: list[dict[str, Any]]
    summary: dict[str, Any]
    grid: list[np.ndarray]
    proxy: dict[str, torch.Tensor]


def evaluate_text2image(pipe, copy_vae, base_vae, owner: CopyOwner, prompts: Sequence[tuple[int, str]],
                        images_dir: str | Path, generation: Generation) -> Text2ImageResult:
    """Generate, decode, save and score; plain arguments (the ``text2image_eval`` task reads the config).

    Parameters:
        pipe: the pipeline (its UNet and text encoder make the latents).
        copy_vae: the user's copy (``load_copy``); base_vae: the control decoder, or None.
        owner: whose copy it is, the code registered for them, and the distributor's reader.
        prompts: ``(COCO sample index, caption)`` pairs; the index sets the image's seed and file name.
        images_dir: PNGs go to ``images_dir/copy/<index>.png`` and ``images_dir/base/<index>.png``;
            the rows' ``file`` and ``base_file`` are relative to it.
        generation: how the images are made.
    """
    g = generation
    images_dir = Path(images_dir)
    (images_dir / COPY_IMAGES).mkdir(parents=True, exist_ok=True)
    if base_vae is not None:
        (images_dir / BASE_IMAGES).mkdir(parents=True, exist_ok=True)
    collected = _Collected()
    start = time.perf_counter()
    with tqdm(total=len(prompts), desc="text2image", unit="img", disable=not g.progress) as bar:
        for first in range(0, len(prompts), g.batch_size):
            batch = prompts[first : first + g.batch_size]
            latents = generate_latents(pipe, [caption for _, caption in batch],
                                       [image_seed(g.seed, i) for i, _ in batch],
                                       g.resolution, g.num_inference_steps, g.guidance_scale)
            decoded = {"copy": decode_to_pixels(copy_vae, latents)}
            if base_vae is not None:
                decoded["base"] = decode_to_pixels(base_vae, latents)
            rows, collected.match_threshold = _score_batch(batch, decoded, owner, images_dir, g.seed)
            collected.rows.extend(rows)
            for name, pixels in decoded.items():
                collected.grid[name].extend(pixels[: g.grid_images - len(collected.grid[name])])
                if g.proxy_side is not None:
                    collected.proxy[name].append(_resize(from_uint8(pixels), g.proxy_side))
            bar.update(len(batch))
    return Text2ImageResult(
        images=collected.rows,
        summary=_summary(collected, owner.user_id, time.perf_counter() - start, base_vae is not None),
        grid=[np.stack(collected.grid[name]) for name in ("base", "copy") if collected.grid[name]],
        proxy={name: torch.cat(parts) for name, parts in collected.proxy.items() if parts},
    )


def reference_images(fid_mode: str, coco, indices: Sequence[int], resolution: int, images_dir: Path,
                     proxy_side: int | None) -> torch.Tensor | None:
    """The COCO images of ``indices``, resized and centre-cropped to the generated images' side,
    that the Frechet distance compares against: ``clean`` writes them as PNGs to
    ``images_dir/reference`` (clean-fid reads folders); ``proxy`` returns them at ``proxy_side``."""
    if fid_mode == "off":
        return None
    at_resolution = CocoCaptions(coco.root, coco.split, resolution, coco.annotation_file)
    images = torch.stack([at_resolution[i]["image"] for i in indices])
    if fid_mode != "clean":
        return _resize(images, int(proxy_side))
    (images_dir / REFERENCE_IMAGES).mkdir()
    for i, pixels in zip(indices, to_uint8(images)):
        _save_png(pixels, images_dir / REFERENCE_IMAGES / f"{i:05d}.png")
    return None


def frechet_scores(
    mode: str,
    images_dir: Path,
    has_base: bool,
    reference: torch.Tensor | None = None,
    proxy_images: dict[str, torch.Tensor] | None = None,
    proxy_net=None,
    device: torch.device | None = None,
) -> dict[str, float | None]:
    """Frechet distances of the copy's and the base's images to the COCO reference images.

    ``clean``: ``fid`` / ``fid_base`` (clean-fid on the PNG folders). ``proxy``: ``fid_proxy`` /
    ``fid_proxy_base`` from ``proxy_images`` and ``reference`` (already at the proxy's side).
    """
    scores: dict[str, float | None] = {
        "fid": None,
        "fid_base": None,
        "fid_proxy": None,
        "fid_proxy_base": None,
    }
    if mode == "clean":
        reference_dir = images_dir / REFERENCE_IMAGES
        scores["fid"] = clean_fid(images_dir / COPY_IMAGES, reference_dir, device=device)
        if has_base:
            scores["fid_base"] = clean_fid(images_dir / BASE_IMAGES, reference_dir, device=device)
    elif mode == "proxy":
        scores["fid_proxy"] = frechet_distance_proxy(proxy_images["copy"], reference, proxy_net)
        if has_base:
            scores["fid_proxy_base"] = frechet_distance_proxy(proxy_images["base"], reference, proxy_net)
    return scores


