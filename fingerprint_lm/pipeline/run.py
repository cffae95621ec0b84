"""``run(cfg)``: the one function the entry point calls; returns the metrics dict (tests call it)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from fingerprint_lm.distributor.tasks import DISTRIBUTOR_TASKS, run_task
from fingerprint_lm.errors import ConfigError
from fingerprint_lm.pipeline import stages
from fingerprint_lm.pipeline.cache import atomic_write_text
from fingerprint_lm.pipeline.checkpoint import save_fingerprint_model
from fingerprint_lm.report.plots import write_training_curve

log = logging.getLogger(__name__)


def _plain(node) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def make_trainer_factory(cfg: DictConfig, output_dir: Path):
    """A function building Lightning Trainers from ``cfg.trainer`` with per-stage overrides."""
    loggers = [] if not cfg.get("logger") else [instantiate(cfg.logger)]
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]

    def make_trainer(**overrides):
        kwargs = {"logger": loggers or False, "callbacks": callbacks, **overrides}
        return instantiate(cfg.trainer, **kwargs)

    return make_trainer, loggers


def run(cfg: DictConfig) -> dict[str, Any]:
    """Base VAE -> PNM + extractor training -> evaluation -> ``metrics.json`` in the run dir."""
    if cfg.task in DISTRIBUTOR_TASKS:
        return run_task(cfg)
    if cfg.task == "sweep_point":
        from fingerprint_lm.pipeline.sweep import run_sweep_point

        return run_sweep_point(cfg)
    try:
        return _run(cfg)
    except InstantiationException as exc:
        # Hydra's message spans several lines (target, cause, key): one line for the user.
        raise ConfigError(" ".join(line.strip() for line in str(exc).splitlines() if line.strip())) from exc


def _positive_int(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return value


def _run(cfg: DictConfig) -> dict[str, Any]:
    if cfg.task != "train":
        raise ConfigError(f"unknown task '{cfg.task}' (expected: train, sweep_point, {', '.join(DISTRIBUTOR_TASKS)})")
    bits = _positive_int("fingerprint_bits", cfg.fingerprint_bits)
    _positive_int("method.steps", cfg.method.steps)
    if cfg.model.source == "config":
        _positive_int("model.pretrain.steps", cfg.model.pretrain.steps)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    os.environ.setdefault("WANDB_SILENT", "true")

    datamodule = instantiate(cfg.data)
    make_trainer, loggers = make_trainer_factory(cfg, output_dir)
    make_trainer(logger=False, callbacks=[])  # a bad trainer.* value fails now, before any training
    try:
        vae, vae_facts = stages.prepare_base_vae(
            source=cfg.model.source,
            cache_dir=cfg.paths.cache_dir,
            datamodule=datamodule,
            make_trainer=make_trainer,
            vae_config=_plain(cfg.model.vae_config),
            path=cfg.model.path,
            pretrain=_plain(cfg.model.pretrain),
        )
        last = output_dir / "checkpoints" / "last.ckpt"
        ckpt_path = str(last) if cfg.resume and last.is_file() else None
        if ckpt_path:
            log.info("resuming from %s", ckpt_path)
        model, module, train_facts = stages.train_fingerprint(
            vae,
            bits,
            datamodule,
            make_trainer,
            pnm_kwargs=_plain(cfg.method.pnm),
            extractor_kwargs=_plain(cfg.method.extractor),
            train_kwargs=_plain(cfg.method.train),
            augment_kwargs=_plain(cfg.method.augment),
            detector_fit_samples=cfg.method.detector_fit_samples,
            ckpt_path=ckpt_path,
            seed=cfg.seed,
        )
        write_training_curve(module.history, output_dir / "training_curve.csv", output_dir / "training_curve.png")
        eval_metrics = stages.evaluate_fingerprint(model, datamodule.test_dataloader(), cfg.eval.max_images)
        metrics: dict[str, Any] = {"fingerprint_bits": bits, **eval_metrics, **train_facts, **vae_facts}
        model.meta.update(
            {
                "fingerprint_bits": bits,
                "pnm": _plain(cfg.method.pnm),
                "extractor": _plain(cfg.method.extractor),
                "resolution": cfg.data.resolution,
                "metrics": {k: v for k, v in metrics.items() if k in ("bit_acc", "psnr", "ssim", "steps")},
            }
        )
        checkpoint_dir = save_fingerprint_model(model, output_dir / "fingerprint_model")
        metrics["checkpoint"] = str(checkpoint_dir)
        if cfg.export_checkpoint:
            save_fingerprint_model(model, cfg.paths.export_dir)
            metrics["exported_to"] = str(cfg.paths.export_dir)
        for logger in loggers:
            logger.log_metrics({f"eval/{k}": v for k, v in _flatten(metrics).items() if isinstance(v, float | int)})
        atomic_write_text(output_dir / "metrics.json", json.dumps(metrics, indent=2, sort_keys=True))
        log.info("metrics: bit_acc=%.4f psnr=%.2f ssim=%.4f (%s)", metrics["bit_acc"], metrics["psnr"],
                 metrics["ssim"], output_dir / "metrics.json")
        return metrics
    finally:
        finish_wandb(loggers)


def _flatten(metrics: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}/"))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def finish_wandb(loggers) -> None:
    """End the W&B run of a job (if one of ``loggers`` is W&B), so the next job starts its own."""
    if any(type(lg).__name__ == "WandbLogger" for lg in loggers):
        import wandb

        wandb.finish()
