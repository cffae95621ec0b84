"""``task=text2image_eval``: a local Stable Diffusion folder with a user's copy as its VAE
(:mod:`fingerprint_lm.evaluation.text2image`); reads ``text2image.*`` and, for the registry, copies
and checkpoint, ``distributor.*``; writes ``text2image_metrics.json`` and the grid.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from rich.console import Console

from fingerprint_lm.config_schema import DistributorConfig, Text2ImageConfig, read_settings
from fingerprint_lm.data.coco import CocoCaptions
from fingerprint_lm.devices import resolve_device
from fingerprint_lm.distributor.copies import check_user_id, load_copy
from fingerprint_lm.distributor.screening import bound_pass_rate
from fingerprint_lm.errors import CheckpointError, ConfigError
from fingerprint_lm.evaluation.sd_pipeline import (
    check_copy_fits,
    check_pipeline_folder,
    load_pipeline_vae,
    load_text2image_pipeline,
)
from fingerprint_lm.evaluation.text2image import (
    GRID_NAME,
    METRICS_NAME,
    CopyOwner,
    Generation,
    choose_fid_mode,
    evaluate_text2image,
    frechet_scores,
    reference_images,
    resolve_dtype,
    write_grid,
)
from fingerprint_lm.metrics.fid import clean_fid_available, train_proxy_feature_net
from fingerprint_lm.models.checkpoint import load_fingerprint_model
from fingerprint_lm.registry.store import open_registry
from fingerprint_lm.storage import atomic_directory
from fingerprint_lm.tasks.distributor import checkpoint_dir
from fingerprint_lm.tasks.wrapper import Task, TaskContext

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Settings:
    """``text2image.*`` (types and ranges checked by :class:`Text2ImageConfig`) and the
    distributor's settings, turned into what the evaluation takes. The cheap checks (the pipeline
    folder, the user id, the device) run here, before any model is loaded."""

    config: Text2ImageConfig
    distributor: DistributorConfig
    pipeline_path: Path
    user_id: str
    device: torch.device
    dtype: torch.dtype

    @property
    def fpr(self) -> float:
        return self.distributor.fpr


def check_settings(cfg: DictConfig) -> Settings:
    config = read_settings(cfg, "text2image")
    distributor = read_settings(cfg, "distributor")
    pipeline_path = check_pipeline_folder(config.pipeline_path)
    if config.user_id is None or isinstance(config.user_id, bool):
        raise ConfigError("task=text2image_eval needs user_id=NAME (whose copy to evaluate)")
    device = resolve_device(config.device, "text2image.device")
    return Settings(config=config, distributor=distributor, pipeline_path=pipeline_path,
                    user_id=check_user_id(str(config.user_id)), device=device,
                    dtype=resolve_dtype(config.dtype, device))


def _copy_and_code(cfg: DictConfig, s: Settings):
    """The checkpoint, the registry's code index, its screened codes' pass rate
    (``screening.bound_pass_rate``; None: none screened) and the user's row, and their verified copy."""
    settings = s.config
    model = load_fingerprint_model(checkpoint_dir(cfg))
    with open_registry(s.distributor.registry, model.fingerprint_bits, method=model.method) as registry:
        row = registry.get(s.user_id)  # RegistryError for an unknown user
        index, rate = registry.index(), bound_pass_rate(registry.screen_pass_rate(), model.meta.get("issue_screen"))
    copy_path = Path(str(settings.copy_path)) if settings.copy_path else Path(s.distributor.copies_dir) / s.user_id
    expected = row["copy_sha256"] if settings.verify_copy else None
    if settings.verify_copy and not expected:
        raise CheckpointError(f"the registry holds no copy hash for {s.user_id!r}; set text2image.verify_copy=false")
    return model, (index, rate), row, copy_path, load_copy(copy_path, expected_sha256=expected).to(s.device)


def _prompts(s: Settings) -> tuple[CocoCaptions, list[tuple[int, str]]]:
    settings = s.config
    coco = CocoCaptions(settings.coco_root, str(settings.split), annotation_file=settings.annotation_file)
    n_images = min(settings.n_images, len(coco))
    if n_images < settings.n_images:
        log.warning("%s has %d captioned images: evaluating %d, not %d", coco.annotation_file, len(coco),
                    n_images, settings.n_images)
    return coco, [(i, coco.captions_for(coco.image_ids[i])[0]) for i in range(n_images)]


def _resolution(s: Settings, pipe, model) -> int:
    resolution = s.config.resolution  # None, or a positive int (Text2ImageConfig)
    if resolution is None:
        resolution = int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)
    if resolution % 8:
        raise ConfigError(f"text2image.resolution must be a multiple of 8 (StableDiffusionPipeline), got {resolution}")
    smallest = int(model.reader.min_image_size)
    if resolution < smallest:
        raise ConfigError(f"text2image.resolution={resolution} is smaller than the extractor reads ({smallest} px)")
    return resolution


def run_text2image_eval(cfg: DictConfig, context: TaskContext) -> dict[str, Any]:
    s = check_settings(cfg)
    settings = s.config
    model, (index, rate), row, copy_path, copy_vae = _copy_and_code(cfg, s)
    coco, prompts = _prompts(s)
    requested_fid = settings.fid  # auto | clean | proxy | off (YAML's `off`, read as false, normalised)
    fid_mode, fid_reason = choose_fid_mode(requested_fid, len(prompts), settings.fid_min_images,
                                           clean_fid_available() if requested_fid != "off" else False)
    pipe = load_text2image_pipeline(s.pipeline_path, copy_vae, s.device, s.dtype)
    base_vae = load_pipeline_vae(s.pipeline_path) if settings.baseline else None
    base_vae = base_vae.to(s.device) if base_vae is not None else None
    check_copy_fits(pipe, copy_vae, base_vae, copy_path)
    resolution = _resolution(s, pipe, model)
    output_dir = Path(str(settings.output_dir))
    output_dir.mkdir(parents=True, exist_ok=True)
    proxy_side = int(settings.fid_proxy_resolution) if fid_mode == "proxy" else None
    proxy_net = (train_proxy_feature_net(proxy_side, steps=int(settings.fid_proxy_steps), cache_dir=cfg.paths.cache_dir)
                 if fid_mode == "proxy" else None)
    torch.manual_seed(settings.seed)  # nothing should draw from the global generator; this pins it if a scheduler does
    # Written beside the target and swapped in at the end: a crash never mixes old and new images.
    with atomic_directory(output_dir / "images") as images_tmp:
        owner = CopyOwner(user_id=s.user_id, code=row["code"], extractor=model.reader.float().cpu().eval(),
                          index=index, fpr=s.fpr, decoding=s.distributor.decoding, screen_pass_rate=rate)
        generation = Generation(resolution=resolution, num_inference_steps=settings.num_inference_steps,
                                guidance_scale=settings.guidance_scale, seed=settings.seed,
                                batch_size=settings.batch_size, grid_images=settings.grid_images,
                                proxy_side=proxy_side, progress=bool(settings.progress))
        result = evaluate_text2image(pipe, copy_vae, base_vae, owner, prompts, images_tmp, generation)
        reference = reference_images(fid_mode, coco, [i for i, _ in prompts], resolution, images_tmp, proxy_side)
    images_dir = output_dir / "images"
    for image_row in result.images:
        for key in ("file", "base_file"):
            if key in image_row:
                image_row[key] = str(images_dir / image_row[key])
    scores = frechet_scores(fid_mode, images_dir, base_vae is not None, reference, result.proxy, proxy_net, s.device)
    grid_path = write_grid(result.grid, output_dir / GRID_NAME) if result.grid else None
    return {
        "task": "text2image_eval", "user_id": s.user_id, "code_length": int(model.fingerprint_bits),
        "n_users": len(index), "fpr": s.fpr, "decoding": s.distributor.decoding, **result.summary, "fid_mode": fid_mode,
        "fid_skipped_reason": fid_reason if fid_mode == "off" else None,
        "fid_note": fid_reason if fid_mode == "proxy" else None, **scores,
        "pipeline_path": str(s.pipeline_path), "copy_path": str(copy_path), "baseline": base_vae is not None,
        "coco_annotation_file": str(coco.annotation_file), "n_images_requested": settings.n_images,
        "resolution": resolution, "num_inference_steps": settings.num_inference_steps,
        "guidance_scale": settings.guidance_scale, "seed": settings.seed, "batch_size": settings.batch_size,
        "device": str(s.device), "dtype": str(s.dtype).removeprefix("torch."), "images_dir": str(images_dir),
        "grid": str(grid_path) if grid_path else None, "images": result.images,
    }


def print_text2image_summary(metrics: dict[str, Any], json_path: Path | None = None) -> None:
    """A few lines for people; the JSON file has every image."""
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


TASK = Task("text2image_eval", run_text2image_eval,
            json_path=lambda cfg: Path(str(cfg.text2image.output_dir)) / METRICS_NAME,
            summarize=print_text2image_summary)
