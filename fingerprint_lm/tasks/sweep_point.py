"""``task=sweep_point``: one job of the collusion sweep (``+experiment=collusion_sweep``).

A job evaluates ``sweep.case`` for ``act.type`` on the trained model of its ``method`` and
``fingerprint_bits`` (:func:`sweep_model_dir`: given, shipped, or trained once and cached) with
:func:`fingerprint_lm.evaluation.collusion.evaluate_point`, and writes ``metrics.json`` in its job
dir; a re-run returns the existing one when its ``point_key`` matches. :class:`SummarizeSweep`
writes the sweep's summary when the multirun ends.
"""

from __future__ import annotations

import copy
import fcntl
import hashlib
import json
import logging
import math
from dataclasses import fields
from pathlib import Path
from typing import Any

import torch
from hydra.experimental.callback import Callback
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from fingerprint_lm.config_schema import read_settings
from fingerprint_lm.devices import resolve_device
from fingerprint_lm.errors import ConfigError
from fingerprint_lm.evaluation.collusion import Point, PointSettings, evaluate_point
from fingerprint_lm.lit import stages
from fingerprint_lm.methods.base import collect_images
from fingerprint_lm.metrics.fid import train_proxy_feature_net
from fingerprint_lm.models.checkpoint import (
    SHIPPED_CHECKPOINT,
    checkpoint_code_length,
    load_fingerprint_model,
    recorded_method,
    save_fingerprint_model,
    shipped_checkpoint,
)
from fingerprint_lm.models.vae import load_vae
from fingerprint_lm.report.tables import write_summary
from fingerprint_lm.storage import config_hash
from fingerprint_lm.tasks.train import (
    after_fit_device,
    fit_method_content_reader,
    method_from_config,
    quiet_trainer_factory,
    train_from_config,
)
from fingerprint_lm.tasks.training_record import matches_shipped, record_training_config, training_record
from fingerprint_lm.tasks.wrapper import Task, TaskContext

log = logging.getLogger(__name__)


# -- which trained model a point uses ------------------------------------------------------------
# What training writes beyond what its config says, in the sweep cache's key: raised when a change
# of the code alone changes a trained model, so no cached model from before is reused.
# 2 (2026-12-05): the carrier reader's soft-decision whitening, fitted after training.
TRAINED_MODEL_VERSION = 2


def _given_checkpoint(cfg: DictConfig) -> Path:
    directory = Path(cfg.sweep.checkpoint)
    bits = cfg.fingerprint_bits
    length = checkpoint_code_length(directory)
    if length != bits:
        raise ConfigError(
            f"fingerprint_bits={bits} but the checkpoint {directory} has {length}-bit codes "
            "(sweep.checkpoint=null trains a model per length)"
        )
    recorded = recorded_method(json.loads((directory / "fingerprint.json").read_text()))
    if recorded != cfg.method.name:
        raise ConfigError(
            f"method={cfg.method.name} but the checkpoint {directory} was trained by method={recorded} "
            f"(sweep only that method: method={recorded})"
        )
    return directory


def training_config(cfg: DictConfig) -> DictConfig:
    """``cfg`` as the per-length training sees it: ``seed`` (and so the data stream, whose seed
    interpolates it) is ``sweep.train_seed``, so points of other seeds share one trained model."""
    train_cfg = copy.deepcopy(cfg)
    with open_dict(train_cfg):
        train_cfg.seed = int(cfg.sweep.train_seed)
    return train_cfg


def sweep_model_dir(cfg: DictConfig) -> tuple[Path, str]:
    """The trained model a sweep point evaluates, and where it came from.

    ``sweep.checkpoint`` set: that folder (its length must be ``fingerprint_bits``): ``"given"``.
    Otherwise the shipped checkpoint of the method when its recorded training config
    (:func:`training_record`: length, PNM, extractor, resolution, steps, recipe) matches the sweep's:
    ``"shipped"``. Otherwise a model trained once for this training config on the shipped
    checkpoint's base VAE, cached under ``paths.cache_dir/sweep_models/<hash>`` and reused by every
    ACT/attack/colluder point: ``"trained"`` for the point that trained it, ``"cached"`` after. A
    file lock makes parallel jobs (submitit) wait for one training instead of repeating it.
    """
    if cfg.sweep.checkpoint:
        return _given_checkpoint(cfg), "given"
    record = training_record(cfg, method_from_config(cfg))
    shipped = shipped_checkpoint(str(cfg.method.checkpoint_name))
    if (shipped / "fingerprint.json").is_file() and matches_shipped(
            json.loads((shipped / "fingerprint.json").read_text()), record):
        return shipped, "shipped"
    base_vae_dir = SHIPPED_CHECKPOINT / "base_vae"  # every method trains on the same base VAE
    cfg = training_config(cfg)
    target = sweep_model_cache_dir(cfg, record, base_vae_dir)
    if (target / "fingerprint.json").is_file():
        return target, "cached"
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f"{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if (target / "fingerprint.json").is_file():  # another job trained it while we waited
            return target, "cached"
        train_sweep_model(cfg, target, base_vae_dir)
    return target, "trained"


def sweep_model_cache_dir(cfg: DictConfig, record: dict[str, Any], base_vae_dir: Path) -> Path:
    """``paths.cache_dir/sweep_models/<hash>``: the hash covers the training config and the bytes
    of the base VAE it trains on, so a re-pretrained base VAE (same config, new weights) never
    reuses a model cached on the old one."""
    weights_digest = hashlib.sha256()
    for path in sorted(base_vae_dir.iterdir()):
        weights_digest.update(path.name.encode() + b"\0" + path.read_bytes())
    full = {
        **record,
        "method": OmegaConf.to_container(cfg.method, resolve=True),
        "data": OmegaConf.to_container(cfg.data, resolve=True),
        "trainer_precision": str(cfg.trainer.precision),
        "train_seed": int(cfg.sweep.train_seed),
        "base_vae": weights_digest.hexdigest()[:16],
        "produces": TRAINED_MODEL_VERSION,
    }
    return Path(cfg.paths.cache_dir) / "sweep_models" / config_hash(full)


def train_sweep_model(cfg: DictConfig, target: Path, base_vae_dir: Path) -> None:
    """Train the fingerprint model of ``cfg`` (``fingerprint_bits``, ``method``, ``data``) on the base
    VAE in ``base_vae_dir``, evaluate it on held-out images and save it atomically to ``target``."""
    make_trainer = quiet_trainer_factory(cfg, default_root_dir=str(target.parent))
    bits = int(cfg.fingerprint_bits)
    log.info("sweep: training a %d-bit fingerprint model (%d steps), cached at %s", bits, cfg.method.steps, target)
    datamodule = instantiate(cfg.data)
    method = method_from_config(cfg)
    model, _, facts = train_from_config(cfg, load_vae(base_vae_dir), datamodule, make_trainer,
                                        seed=int(cfg.sweep.train_seed), method=method)
    content_reader = fit_method_content_reader(method, model, datamodule, after_fit_device(cfg))  # as training does
    quality = stages.evaluate_fingerprint(model, datamodule.test_dataloader(), int(cfg.eval.max_images))
    # facts: steps, and pnm's calibration slopes
    record_training_config(model, cfg, {**facts, **quality, **content_reader})
    model.meta["metrics"]["train_seconds"] = facts["train_seconds"]
    model.meta["trained_by"] = "collusion sweep (fingerprint_lm.tasks.sweep_point.train_sweep_model)"
    save_fingerprint_model(model, target)
    log.info("sweep: %d-bit model trained in %.0f s: bit_acc %.4f, PSNR %.2f dB", bits, facts["train_seconds"],
             quality["bit_acc"], quality["psnr"])


def sweep_images(cfg: DictConfig, resolution: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``sweep.images``: ``procedural`` (None, None: the evaluation draws its own) or ``data``: the
    first ``sweep.n_images`` test images of ``cfg.data`` (e.g. ``data=coco``) and 256 training
    images for the fine-tuning attacker, at the model's resolution."""
    settings = read_settings(cfg, "sweep")
    if settings.images == "procedural":
        return None, None
    if int(cfg.data.resolution) != resolution:
        raise ConfigError(f"data.resolution={cfg.data.resolution} but the model was trained at {resolution}")
    datamodule = instantiate(cfg.data)
    return (
        collect_images(datamodule.test_dataloader(), settings.n_images),
        collect_images(datamodule.train_dataloader(), 256),
    )


# -- the task -------------------------------------------------------------------------------------
def point_settings(cfg: DictConfig) -> PointSettings:
    """``sweep.*`` and ``act.*`` as the evaluation library's settings, whose own checks are the
    only ones of their ranges: each message starts with the field's name, ``sweep.``'s key."""
    settings, act = read_settings(cfg, "sweep"), read_settings(cfg, "act")
    device = resolve_device(settings.device, "sweep.device")
    try:
        return _point_settings(settings, act, device)
    except ConfigError as exc:
        raise ConfigError(f"sweep.{exc}") from None


def _point_settings(settings, act, device) -> PointSettings:
    return PointSettings(
        n_images=settings.n_images,
        n_innocents=settings.n_innocents,
        fpr=settings.fpr,
        tracing_fpr=settings.tracing_fpr,
        decoding=settings.decoding,
        scale_range=(act.scale_min, act.scale_max),
        act_scope=act.scope,
        finetune_lr=settings.finetune_lr,
        screen_codes=settings.screen_codes,
        screen_by=settings.screen_by,
        device=device,
    )


def point_record(cfg: DictConfig, directory: Path, settings: PointSettings) -> dict[str, Any]:
    """Everything a point's result depends on (where it runs aside); its hash is the ``point_key``
    a re-run matches."""
    evaluation = {f.name: getattr(settings, f.name) for f in fields(settings) if f.name != "device"}
    return {
        "method": str(cfg.method.name),
        "fingerprint_bits": cfg.fingerprint_bits,
        "act": cfg.act.type,
        "case": str(cfg.sweep.case),
        "seed": int(cfg.seed),
        **evaluation,
        "scale_range": list(settings.scale_range),
        "fid_proxy_steps": int(cfg.sweep.fid_proxy_steps),
        "images": str(cfg.sweep.images),
        "checkpoint": str(directory.resolve()),
        "checkpoint_meta": config_hash(json.loads((directory / "fingerprint.json").read_text())),
    }


def _previous(metrics_path: Path, key: str) -> dict[str, Any] | None:
    if not metrics_path.is_file():
        return None
    try:
        previous = json.loads(metrics_path.read_text())
    except json.JSONDecodeError:
        return None
    return previous if previous.get("point_key") == key else None


def run_sweep_point(cfg: DictConfig, context: TaskContext) -> dict[str, Any]:
    point = Point.from_case(str(cfg.act.type), str(cfg.sweep.case))
    settings = point_settings(cfg)  # refused before a model is trained for it
    directory, model_source = sweep_model_dir(cfg)
    record = point_record(cfg, directory, settings)
    key = config_hash(record)
    context.output_dir.mkdir(parents=True, exist_ok=True)
    if (previous := _previous(context.output_dir / "metrics.json", key)) is not None:
        log.info("sweep point %s/%s already done: skipped", point.act, cfg.sweep.case)
        context.reused = True
        return previous
    # one W&B run per point, grouped by the sweep dir (the job dir is <sweep dir>/<job num>)
    loggers = context.open_loggers(cfg, **({"group": context.output_dir.parent.name}
                                           if "group" in (cfg.get("logger") or {}) else {}))
    model = load_fingerprint_model(directory)
    if cfg.fingerprint_bits != model.fingerprint_bits:
        raise ConfigError(f"fingerprint_bits={cfg.fingerprint_bits} but the model has "
                          f"{model.fingerprint_bits}-bit codes")
    resolution = int(model.meta.get("resolution", 32))
    steps = int(cfg.sweep.fid_proxy_steps)
    fid_net = train_proxy_feature_net(resolution, steps=steps, cache_dir=cfg.paths.cache_dir) if steps > 0 else None
    images, tune_images = sweep_images(cfg, resolution)
    torch.manual_seed(int(cfg.seed))
    result = evaluate_point(model, point, settings, int(cfg.seed), fid_net, images, tune_images)
    metrics = {**result.as_dict(), "case": str(cfg.sweep.case), "point_key": key, "point": record,
               "model_source": model_source}
    for logger in loggers:
        logger.log_metrics(
            {f"sweep/{k}": v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        )
    return metrics


def _fmt(value) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def _summary(metrics: dict[str, Any], json_path: Path | None) -> None:
    log.info("sweep point act=%s case=%s: bit_acc=%.4f psnr=%.2f fid_proxy=%s (%.1f s)", metrics["act"],
             metrics["case"], metrics["bit_acc"], metrics["psnr"], _fmt(metrics["fid_proxy"]), metrics["seconds"])


TASK = Task("sweep_point", run_sweep_point, json_path=lambda cfg: Path(cfg.paths.output_dir) / "metrics.json",
            summarize=_summary, sort_keys=True)


class SummarizeSweep(Callback):
    """Hydra callback: write the sweep summary (:func:`~fingerprint_lm.report.tables.write_summary`)
    once every job of the multirun has finished."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(OmegaConf.select(config, "hydra.sweep.dir"))
        paths = write_summary(sweep_dir)
        log.info("sweep summary: %s", ", ".join(str(p) for p in paths))
