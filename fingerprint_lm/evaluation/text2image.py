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

import contextlib
import json
import logging
import math
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image
from torch.nn import functional as F

from fingerprint_lm.devices import resolve_device
from fingerprint_lm.distributor.generation import to_uint8_pixels
from fingerprint_lm.errors import CheckpointError, ConfigError

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
    if isinstance(min_images, bool) or not isinstance(min_images, int) or min_images < 2:
        raise ConfigError(f"text2image.fid_min_images must be an integer >= 2, got {min_images!r}")
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


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"text2image.{name} must be a positive integer, got {value!r}")
    return value


# -- loading --------------------------------------------------------------------------------------
@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """transformers' and diffusers' loggers at ERROR and their loading bars off, restored after:
    their import-time and load-time notices would otherwise break the one-line error contract."""
    import diffusers.utils.logging as diffusers_logging
    import transformers.utils.logging as transformers_logging

    libraries = (transformers_logging, diffusers_logging)
    before = [(lib.get_verbosity(), lib.is_progress_bar_enabled()) for lib in libraries]
    for lib in libraries:
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, (level, bars) in zip(libraries, before):
            lib.set_verbosity(level)
            if bars:
                lib.enable_progress_bar()


def check_pipeline_folder(path: str | Path | None) -> Path:
    """The pipeline folder, if it looks like a saved diffusers pipeline (``model_index.json``)."""
    if path is None or str(path) == "":
        raise ConfigError(
            "task=text2image_eval needs text2image.pipeline_path=PATH (a local Stable Diffusion folder)"
        )
    folder = Path(str(path)).expanduser()
    if not (folder / "model_index.json").is_file():
        what = "no such folder" if not folder.exists() else "model_index.json missing"
        raise CheckpointError(f"no Stable Diffusion pipeline at {folder} ({what})")
    return folder


def load_text2image_pipeline(path: str | Path, vae, device: torch.device, dtype: torch.dtype = torch.float32):
    """``StableDiffusionPipeline.from_pretrained(path, vae=vae)`` from local files only.

    ``vae`` (the user's copy) replaces the folder's own VAE at load time, so the pipeline's latent
    scale factor is the copy's and the folder's VAE is not loaded for nothing; it stays in float32.
    No safety checker (the evaluation looks at every image). Raises CheckpointError, in one line,
    for a folder diffusers cannot load.
    """
    folder = check_pipeline_folder(path)
    with quiet_libraries(), warnings.catch_warnings():
        from diffusers import StableDiffusionPipeline

        try:
            # `torch_dtype` is what every diffusers >= 0.30 takes; newer ones prefer `dtype` and say so
            warnings.filterwarnings("ignore", message=".*torch_dtype.* is deprecated", category=FutureWarning)
            pipe = StableDiffusionPipeline.from_pretrained(
                folder,
                vae=vae,
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
                torch_dtype=dtype,
                local_files_only=True,
                low_cpu_mem_usage=False,  # what diffusers falls back to without accelerate, minus the warning
            )
        except Exception as exc:  # diffusers/transformers raise many kinds for incomplete folders
            message = f"cannot load the Stable Diffusion pipeline at {folder}: {type(exc).__name__}: {exc}"
            raise CheckpointError(message.splitlines()[0]) from exc
    pipe = pipe.to(device)  # the copy was passed in: it keeps its float32, whatever ``dtype`` is
    pipe.set_progress_bar_config(disable=True)  # one bar over images instead of one per batch
    return pipe


def load_pipeline_vae(path: str | Path):
    """The pipeline folder's own VAE (``<path>/vae``) in float32, the control decoder; None if absent."""
    from fingerprint_lm.models.vae import load_vae

    folder = Path(path) / "vae"
    if not (folder / "config.json").is_file():
        return None
    with quiet_libraries():
        return load_vae(folder).eval()


def check_copy_fits(pipe, copy_vae, base_vae=None, copy_path: str | Path = "the copy") -> None:
    """ConfigError unless the copy decodes this pipeline's latents: as many latent channels as the
    UNet makes and, when the folder's own VAE is there, the same scaling factor and downscale."""
    unet_channels = int(pipe.unet.config.in_channels)
    if int(copy_vae.config.latent_channels) != unet_channels:
        raise ConfigError(
            f"{copy_path} decodes {copy_vae.config.latent_channels}-channel latents but the pipeline's UNet "
            f"makes {unet_channels}: the copy was issued for another model"
        )
    if base_vae is None:
        return
    for key in ("latent_channels", "scaling_factor"):
        if getattr(copy_vae.config, key) != getattr(base_vae.config, key):
            raise ConfigError(
                f"{copy_path} has {key}={getattr(copy_vae.config, key)} but the pipeline's VAE "
                f"{getattr(base_vae.config, key)}: the copy was issued for another model"
            )
    if len(copy_vae.config.block_out_channels) != len(base_vae.config.block_out_channels):
        raise ConfigError(f"{copy_path} and the pipeline's VAE downscale by different factors")


# -- generation -----------------------------------------------------------------------------------
def image_seed(seed: int, index: int) -> int:
    """Seed of the starting noise of caption ``index``: the same for every copy and batch size."""
    return int(seed) + int(index)


@torch.no_grad()
def generate_latents(
    pipe,
    prompts: Sequence[str],
    seeds: Sequence[int],
    resolution: int,
    num_inference_steps: int,
    guidance_scale: float,
) -> torch.Tensor:
    """Denoised latents ``[B, C, R/f, R/f]`` (pipeline dtype), scaled as the UNet sees them.

    One CPU generator per prompt: diffusers draws each sample's noise from its own generator, so
    sample ``i`` does not depend on its batch neighbours, and CPU draws are the same on every device.
    """
    generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
    out = pipe(
        prompt=list(prompts),
        height=resolution,
        width=resolution,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        generator=generators,
        output_type="latent",
    )
    return out.images


@torch.no_grad()
def decode_to_pixels(vae, latents: torch.Tensor) -> np.ndarray:
    """8-bit RGB ``uint8 [B, H, W, 3]`` of UNet latents: float32 decode of
    ``latents / scaling_factor`` (as StableDiffusionPipeline does), clipped to [-1, 1], rounded."""
    parameter = next(vae.parameters())
    scaled = latents.to(parameter.device, torch.float32) / float(vae.config.scaling_factor)
    return to_uint8_pixels(vae.decode(scaled.to(parameter.dtype)).sample.float())


def pixels_to_tensor(pixels: np.ndarray) -> torch.Tensor:
    """``uint8 [B, H, W, 3]`` -> ``float32 [B, 3, H, W]`` in [-1, 1], as reading the PNG gives."""
    return torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).float() * (2.0 / 255.0) - 1.0


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
def evaluate_text2image(
    pipe,
    copy_vae,
    base_vae,
    extractor: torch.nn.Module,
    index,
    user_id: str,
    code: np.ndarray,
    prompts: Sequence[tuple[int, str]],
    images_dir: str | Path,
    resolution: int,
    num_inference_steps: int,
    guidance_scale: float,
    seed: int,
    batch_size: int = 4,
    fpr: float = 1e-6,
    grid_images: int = 8,
    proxy_side: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Generate, decode, save and score; plain arguments (``run_text2image_eval`` reads the config).

    Parameters:
        pipe: the pipeline (its UNet and text encoder make the latents).
        copy_vae: the user's copy (``load_copy``); base_vae: the control decoder, or None.
        extractor, index: the distributor's extractor (CPU) and the registry's ``CodeIndex``.
        user_id, code: whose copy it is, and the code registered for them.
        prompts: ``(COCO sample index, caption)`` pairs; the index sets the image's seed and file name.
        images_dir: PNGs go to ``images_dir/copy/<index>.png`` and ``images_dir/base/<index>.png``;
            the rows' ``file`` and ``base_file`` are relative to it.
        proxy_side: when set, also keep every image resized to this side (for fid_proxy).

    Returns ``{"images": [per-image rows], "summary": {...}, "grid": [uint8 rows], "proxy": {...}}``.
    """
    from tqdm.auto import tqdm

    from fingerprint_lm.distributor.attribution import attribute_images
    from fingerprint_lm.metrics.quality import psnr

    images_dir = Path(images_dir)
    copy_dir, base_dir = images_dir / COPY_IMAGES, images_dir / BASE_IMAGES
    copy_dir.mkdir(parents=True, exist_ok=True)
    if base_vae is not None:
        base_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    grid_copy: list[np.ndarray] = []
    grid_base: list[np.ndarray] = []
    proxy: dict[str, list[torch.Tensor]] = {"copy": [], "base": []}
    match_threshold = None
    start = time.perf_counter()
    with tqdm(total=len(prompts), desc="text2image", unit="img", disable=not progress) as bar:
        for first in range(0, len(prompts), batch_size):
            batch = prompts[first : first + batch_size]
            seeds = [image_seed(seed, i) for i, _ in batch]
            latents = generate_latents(
                pipe,
                [caption for _, caption in batch],
                seeds,
                resolution,
                num_inference_steps,
                guidance_scale,
            )
            decoded = {"copy": decode_to_pixels(copy_vae, latents)}
            if base_vae is not None:
                decoded["base"] = decode_to_pixels(base_vae, latents)
            tensors = {name: pixels_to_tensor(pixels) for name, pixels in decoded.items()}
            names = [f"{i:05d}.png" for i, _ in batch]
            verdicts = {
                name: attribute_images(extractor, index, list(zip(names, tensors[name])), fpr=fpr)
                for name in decoded
            }
            match_threshold = verdicts["copy"]["match_threshold"]
            quality = psnr(tensors["copy"], tensors["base"]).tolist() if base_vae is not None else None
            for j, ((i, caption), image_seed_j) in enumerate(zip(batch, seeds)):
                _save_png(decoded["copy"][j], copy_dir / names[j])
                verdict = verdicts["copy"]["images"][j]
                row = {
                    "index": i,
                    "caption": caption,
                    "seed": image_seed_j,
                    "file": f"{COPY_IMAGES}/{names[j]}",
                    "bits": verdict["bits"],
                    "bit_acc": _bit_accuracy(verdict["bits"], code),
                    "accused_user": verdict["user_id"],
                    "nearest_user_id": verdict["nearest_user_id"],
                    "matching_bits": verdict["matching_bits"],
                    "p_value": verdict["p_value"],
                }
                if base_vae is not None:
                    _save_png(decoded["base"][j], base_dir / names[j])
                    control = verdicts["base"]["images"][j]
                    row.update(
                        base_file=f"{BASE_IMAGES}/{names[j]}",
                        base_bit_acc=_bit_accuracy(control["bits"], code),
                        base_accused_user=control["user_id"],
                        psnr_vs_base=float(quality[j]),
                    )
                rows.append(row)
            if len(grid_copy) < grid_images:
                take = grid_images - len(grid_copy)
                grid_copy.extend(decoded["copy"][:take])
                if base_vae is not None:
                    grid_base.extend(decoded["base"][:take])
            if proxy_side is not None:
                for name, batch_images in tensors.items():
                    proxy[name].append(_resize(batch_images, proxy_side))
            bar.update(len(batch))
    seconds = time.perf_counter() - start

    n = len(rows)
    summary: dict[str, Any] = {
        "n_images": n,
        "bit_acc": float(np.mean([r["bit_acc"] for r in rows])),
        "bit_acc_min": float(min(r["bit_acc"] for r in rows)),
        "attributed_rate": sum(r["accused_user"] == user_id for r in rows) / n,
        "misattributed": sum(r["accused_user"] not in (None, user_id) for r in rows),
        "match_threshold": match_threshold,
        "seconds": seconds,
        "images_per_second": n / seconds if seconds > 0 else None,
    }
    if base_vae is not None:
        summary.update(
            bit_acc_base=float(np.mean([r["base_bit_acc"] for r in rows])),
            base_accused_rate=sum(r["base_accused_user"] is not None for r in rows) / n,
            psnr_vs_base=float(np.mean([r["psnr_vs_base"] for r in rows])),
        )
    grid = [np.stack(grid_base)] if grid_base else []
    if grid_copy:
        grid.append(np.stack(grid_copy))
    return {
        "images": rows,
        "summary": summary,
        "grid": grid,
        "proxy": {name: torch.cat(parts) for name, parts in proxy.items() if parts},
    }


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
    from fingerprint_lm.metrics.fid import clean_fid, frechet_distance_proxy

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


def run_text2image_eval(cfg: DictConfig) -> dict[str, Any]:
    """``task=text2image_eval``: read ``cfg.text2image`` (and ``cfg.distributor`` for the registry,
    copies and checkpoint), evaluate, write ``text2image_metrics.json`` + the grid, print a summary."""
    from fingerprint_lm.data.coco import CocoCaptions
    from fingerprint_lm.distributor.copies import check_user_id, load_copy
    from fingerprint_lm.distributor.tasks import checkpoint_dir, open_registry
    from fingerprint_lm.metrics.fid import clean_fid_available, train_proxy_feature_net
    from fingerprint_lm.models.checkpoint import load_fingerprint_model
    from fingerprint_lm.storage import atomic_directory, atomic_write_text

    settings = cfg.text2image
    # Cheap checks first: a bad folder, user or setting fails before any model is loaded.
    pipeline_path = check_pipeline_folder(settings.pipeline_path)
    if settings.user_id is None or isinstance(settings.user_id, bool):
        raise ConfigError("task=text2image_eval needs user_id=NAME (whose copy to evaluate)")
    user_id = check_user_id(str(settings.user_id))
    n_requested = _positive_int("n_images", settings.n_images)
    batch_size = _positive_int("batch_size", settings.batch_size)
    steps = _positive_int("num_inference_steps", settings.num_inference_steps)
    grid_images = int(settings.grid_images)
    if grid_images < 0:
        raise ConfigError(f"text2image.grid_images must be >= 0, got {grid_images}")
    guidance_scale = float(settings.guidance_scale)
    if not math.isfinite(guidance_scale) or guidance_scale < 0:
        raise ConfigError(
            f"text2image.guidance_scale must be a finite number >= 0, got {settings.guidance_scale}"
        )
    fpr = float(cfg.distributor.fpr)
    if not 0.0 < fpr < 1.0:
        raise ConfigError(f"distributor.fpr must lie in (0, 1), got {cfg.distributor.fpr}")
    device = resolve_device(settings.device, "text2image.device")
    dtype = resolve_dtype(settings.dtype, device)
    seed = int(settings.seed)

    model = load_fingerprint_model(checkpoint_dir(cfg.distributor.checkpoint, cfg.method.checkpoint_name))
    with open_registry(cfg.distributor.registry, model.fingerprint_bits, method=model.method) as registry:
        row = registry.get(user_id)  # RegistryError for an unknown user
        index = registry.index()
    copy_path = (
        Path(str(settings.copy_path)) if settings.copy_path else Path(cfg.distributor.copies_dir) / user_id
    )
    expected = row["copy_sha256"] if settings.verify_copy else None
    if settings.verify_copy and not expected:
        raise CheckpointError(
            f"the registry holds no copy hash for {user_id!r}; set text2image.verify_copy=false"
        )
    copy_vae = load_copy(copy_path, expected_sha256=expected).to(device)
    coco = CocoCaptions(settings.coco_root, str(settings.split), annotation_file=settings.annotation_file)
    n_images = min(n_requested, len(coco))
    if n_images < n_requested:
        log.warning(
            "%s has %d captioned images: evaluating %d, not %d",
            coco.annotation_file,
            len(coco),
            n_images,
            n_requested,
        )
    prompts = [(i, coco.captions_for(coco.image_ids[i])[0]) for i in range(n_images)]
    requested_fid = "off" if settings.fid is False else str(settings.fid)  # YAML 1.1 reads `off` as false
    fid_mode, fid_reason = choose_fid_mode(
        requested_fid,
        n_images,
        settings.fid_min_images,
        clean_fid_available() if requested_fid != "off" else False,
    )

    pipe = load_text2image_pipeline(pipeline_path, copy_vae, device, dtype)
    base_vae = load_pipeline_vae(pipeline_path) if settings.baseline else None
    if base_vae is not None:
        base_vae = base_vae.to(device)
    check_copy_fits(pipe, copy_vae, base_vae, copy_path)
    resolution = settings.resolution
    if resolution is None:
        resolution = int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
    resolution = _positive_int("resolution", resolution)
    if resolution % 8:
        raise ConfigError(
            f"text2image.resolution must be a multiple of 8 (StableDiffusionPipeline), got {resolution}"
        )
    smallest = int(model.extractor.min_image_size)
    if resolution < smallest:
        raise ConfigError(
            f"text2image.resolution={resolution} is smaller than the extractor reads ({smallest} px)"
        )

    output_dir = Path(str(settings.output_dir))
    output_dir.mkdir(parents=True, exist_ok=True)
    proxy_side = int(settings.fid_proxy_resolution) if fid_mode == "proxy" else None
    proxy_net = reference = None
    if fid_mode == "proxy":
        proxy_net = train_proxy_feature_net(
            proxy_side, steps=int(settings.fid_proxy_steps), cache_dir=cfg.paths.cache_dir
        )
    torch.manual_seed(seed)  # nothing should draw from the global generator; this pins it if a scheduler does
    extractor = model.extractor.float().cpu().eval()
    # Written beside the target and swapped in at the end: a crash never mixes old and new images.
    with atomic_directory(output_dir / "images") as images_tmp:
        result = evaluate_text2image(
            pipe,
            copy_vae,
            base_vae,
            extractor,
            index,
            user_id,
            row["code"],
            prompts,
            images_tmp,
            resolution=resolution,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            seed=seed,
            batch_size=batch_size,
            fpr=fpr,
            grid_images=grid_images,
            proxy_side=proxy_side,
            progress=bool(settings.progress),
        )
        if fid_mode != "off":
            # the reference images resized and centre-cropped to the generated images' size
            at_resolution = CocoCaptions(coco.root, coco.split, resolution, coco.annotation_file)
            reference_images = torch.stack([at_resolution[i]["image"] for i in range(n_images)])
            if fid_mode == "clean":
                pixels = ((reference_images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
                (images_tmp / REFERENCE_IMAGES).mkdir()
                for (i, _), image in zip(prompts, pixels.permute(0, 2, 3, 1).numpy()):
                    _save_png(image, images_tmp / REFERENCE_IMAGES / f"{i:05d}.png")
            else:
                reference = _resize(reference_images, proxy_side)
    images_dir = output_dir / "images"
    for image_row in result["images"]:
        for key in ("file", "base_file"):
            if key in image_row:
                image_row[key] = str(images_dir / image_row[key])
    scores = frechet_scores(
        fid_mode, images_dir, base_vae is not None, reference, result["proxy"], proxy_net, device
    )

    grid_path = write_grid(result["grid"], output_dir / GRID_NAME) if result["grid"] else None
    metrics: dict[str, Any] = {
        "task": "text2image_eval",
        "user_id": user_id,
        "code_length": int(model.fingerprint_bits),
        "n_users": len(index),
        "fpr": fpr,
        **result["summary"],
        "fid_mode": fid_mode,
        "fid_skipped_reason": fid_reason if fid_mode == "off" else None,
        "fid_note": fid_reason if fid_mode == "proxy" else None,
        **scores,
        "pipeline_path": str(pipeline_path),
        "copy_path": str(copy_path),
        "baseline": base_vae is not None,
        "coco_annotation_file": str(coco.annotation_file),
        "n_images_requested": n_requested,
        "resolution": resolution,
        "num_inference_steps": steps,
        "guidance_scale": guidance_scale,
        "seed": seed,
        "batch_size": batch_size,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "images_dir": str(images_dir),
        "grid": str(grid_path) if grid_path else None,
        "images": result["images"],
    }
    json_path = output_dir / METRICS_NAME
    atomic_write_text(json_path, json.dumps(metrics, indent=2))
    print_text2image_summary(metrics, json_path)
    return metrics


def print_text2image_summary(metrics: dict[str, Any], json_path: Path | None = None) -> None:
    """A few lines for people; the JSON file has every image."""
    from rich.console import Console

    console = Console(highlight=False)
    n, k = metrics["n_images"], metrics["code_length"]
    attributed = round(metrics["attributed_rate"] * n)
    console.print(
        f"text2image: {n} images at {metrics['resolution']} px from {metrics['pipeline_path']} "
        f"with {metrics['user_id']}'s copy ({metrics['num_inference_steps']} steps, "
        f"guidance {metrics['guidance_scale']:g}, seed {metrics['seed']})"
    )
    console.print(
        f"  bit accuracy {metrics['bit_acc']:.4f} (min {metrics['bit_acc_min']:.4f}, {k} bits); attributed to "
        f"{metrics['user_id']}: {attributed}/{n}, to someone else: {metrics['misattributed']} "
        f"(fpr {metrics['fpr']:g} over {metrics['n_users']} users)"
    )
    if metrics["baseline"]:
        accused = round(metrics["base_accused_rate"] * n)
        console.print(
            f"  pipeline's own VAE (same latents): bit accuracy {metrics['bit_acc_base']:.4f} against the code, "
            f"{accused}/{n} accused; PSNR copy vs base {metrics['psnr_vs_base']:.2f} dB"
        )
    if metrics["fid_mode"] == "clean":
        base = f" (base {metrics['fid_base']:.2f})" if metrics["fid_base"] is not None else ""
        console.print(f"  FID vs COCO (clean-fid): {metrics['fid']:.2f}{base}")
    elif metrics["fid_mode"] == "proxy":
        base = f" (base {metrics['fid_proxy_base']:.2f})" if metrics["fid_proxy_base"] is not None else ""
        console.print(f"  fid_proxy vs COCO: {metrics['fid_proxy']:.2f}{base} [a proxy, not FID]")
    else:
        console.print(f"  no Frechet distance: {metrics['fid_skipped_reason']}")
    if metrics["grid"]:
        console.print(f"  grid: {metrics['grid']}")
    if json_path is not None:
        console.print(f"details: {json_path}")
