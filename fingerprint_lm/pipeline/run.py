"""``run(cfg)``: the one function the entry point calls; returns the metrics dict (tests call it)."""

from __future__ import annotations

import importlib
import json
import logging
import os
import zipfile
from pathlib import Path
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from fingerprint_lm.distributor.tasks import DISTRIBUTOR_TASKS, run_task
from fingerprint_lm.errors import CheckpointError, ConfigError
from fingerprint_lm.methods import FingerprintMethod
from fingerprint_lm.models.checkpoint import save_fingerprint_model
from fingerprint_lm.pipeline import stages
from fingerprint_lm.report.plots import write_training_curve
from fingerprint_lm.storage import atomic_write_text

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


# Tasks other than training and the distributor's: name -> "module:function", imported on use so
# `task=train` never pays for diffusers pipelines or the W&B API.
OTHER_TASKS: dict[str, str] = {
    "sweep_point": "fingerprint_lm.pipeline.sweep:run_sweep_point",
    "text2image_eval": "fingerprint_lm.evaluation.text2image:run_text2image_eval",
    "report": "fingerprint_lm.report.compare:run_report",
}


def run(cfg: DictConfig) -> dict[str, Any]:
    """Base VAE -> PNM + extractor training -> evaluation -> ``metrics.json`` in the run dir."""
    if cfg.task in DISTRIBUTOR_TASKS:
        return run_task(cfg)
    if cfg.task in OTHER_TASKS:
        module_name, function_name = OTHER_TASKS[cfg.task].split(":")
        return getattr(importlib.import_module(module_name), function_name)(cfg)
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
        expected = ", ".join(["train", *OTHER_TASKS, *DISTRIBUTOR_TASKS])
        raise ConfigError(f"unknown task '{cfg.task}' (expected: {expected})")
    bits = _positive_int("fingerprint_bits", cfg.fingerprint_bits)
    method_from_config(cfg)  # a bad method.* value fails now, before any training
    if OmegaConf.is_missing(cfg.model, "path"):
        raise ConfigError(
            "model.path is required: a local diffusers VAE folder (e.g. model.path=/data/sd2/vae)"
        )
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
            dtype=cfg.model.get("dtype"),
            freeze_encoder=bool(cfg.model.get("freeze_encoder", False)),
            scaling_factor=cfg.model.get("scaling_factor"),
        )
        ckpt_path = resume_checkpoint(output_dir / "checkpoints" / "last.ckpt") if cfg.resume else None
        if ckpt_path:
            log.info("resuming from %s", ckpt_path)
        model, module, train_facts = train_from_config(
            cfg, vae, datamodule, make_trainer, ckpt_path=ckpt_path
        )
        if not is_global_zero():
            # strategy=ddp and SLURM run this whole function on every rank: rank 0 alone evaluates
            # and writes the outputs (with ddp_spawn this is the main process, after fit returned).
            return {"fingerprint_bits": bits, **train_facts, **vae_facts}
        write_training_curve(
            module.history, output_dir / "training_curve.csv", output_dir / "training_curve.png"
        )
        eval_metrics = stages.evaluate_fingerprint(model, datamodule.test_dataloader(), cfg.eval.max_images)
        metrics: dict[str, Any] = {"fingerprint_bits": bits, **eval_metrics, **train_facts, **vae_facts}
        record_training_config(model, cfg, metrics)
        checkpoint_dir = save_fingerprint_model(model, output_dir / "fingerprint_model")
        metrics["checkpoint"] = str(checkpoint_dir)
        if cfg.export_checkpoint:
            save_fingerprint_model(model, cfg.paths.export_dir)
            metrics["exported_to"] = str(cfg.paths.export_dir)
        for logger in loggers:
            logger.log_metrics(
                {f"eval/{k}": v for k, v in _flatten(metrics).items() if isinstance(v, float | int)}
            )
        atomic_write_text(output_dir / "metrics.json", json.dumps(metrics, indent=2, sort_keys=True))
        log.info(
            "metrics: bit_acc=%.4f psnr=%.2f ssim=%.4f (%s)",
            metrics["bit_acc"],
            metrics["psnr"],
            metrics["ssim"],
            output_dir / "metrics.json",
        )
        return metrics
    finally:
        finish_wandb(loggers)


def method_from_config(cfg: DictConfig) -> FingerprintMethod:
    """The ``method`` config group's entry, instantiated (``_target_``) with plain values."""
    try:
        return instantiate(cfg.method, _convert_="all")
    except InstantiationException as exc:
        if isinstance(exc.__cause__, ConfigError):  # the method's own check: its message, not Hydra's
            raise exc.__cause__ from None
        # e.g. +method.foo=1: Hydra's message spans several lines (target, cause); one line here,
        # since the sweep's per-length training calls this outside run()'s own wrapper
        raise ConfigError("method: " + " ".join(line.strip() for line in str(exc).splitlines() if line.strip())) from exc


def train_from_config(
    cfg: DictConfig, vae, datamodule, make_trainer, ckpt_path: str | None = None, seed=None
):
    """:func:`stages.train_fingerprint` with ``fingerprint_bits``, the ``method`` and the decoder
    settings of ``model.*`` from ``cfg`` (the training run and the sweep's per-length models)."""
    return stages.train_fingerprint(
        vae,
        _positive_int("fingerprint_bits", cfg.fingerprint_bits),
        datamodule,
        make_trainer,
        method=method_from_config(cfg),
        ckpt_path=ckpt_path,
        seed=cfg.seed if seed is None else seed,
        gradient_checkpointing=bool(cfg.model.get("gradient_checkpointing", False)),
        calibration_batch_size=_positive_int(
            "model.calibration_batch_size", cfg.model.get("calibration_batch_size", 256)
        ),
    )


def record_training_config(model, cfg: DictConfig, metrics: dict[str, Any]) -> None:
    """Write into ``model.meta`` what a checkpoint records of its training (length and resolution;
    the method's record, PNM and extractor settings, is there since the method built the model) and
    its quality figures; the sweep matches checkpoints on these."""
    model.meta.update(
        {
            "fingerprint_bits": int(cfg.fingerprint_bits),
            "resolution": cfg.data.resolution,
            "metrics": {k: v for k, v in metrics.items() if k in ("bit_acc", "psnr", "ssim", "steps")},
        }
    )


def resume_checkpoint(last: Path) -> str | None:
    """``last`` when a run (a requeued SLURM job) should continue from it, None when absent.

    A job killed while Lightning wrote the file leaves it truncated: every requeue would then fail
    inside the Trainer, so say so here (a torch checkpoint is a zip: its directory is at the end)."""
    if not last.is_file():
        return None
    if not zipfile.is_zipfile(last):
        raise CheckpointError(
            f"{last} is not a complete checkpoint (the job was killed while saving?): "
            "delete it to restart the run, or pass resume=false"
        )
    return str(last)


def is_global_zero() -> bool:
    """Whether this process writes a run's outputs: the only process of a single-device run,
    the main process of ``ddp_spawn`` (its ranks are child processes), global rank 0 of
    ``strategy=ddp`` or a SLURM job. Lightning sets this rank from the environment at import
    (``RANK``, ``LOCAL_RANK``, ``SLURM_PROCID``) and again when a DDP strategy starts."""
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


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
