"""``task=train`` (the default): base VAE -> fingerprint training -> evaluation -> ``metrics.json``.

Also the config readers the collusion sweep's per-length training shares: :func:`method_from_config`,
:func:`train_from_config` (what a checkpoint records of them: :mod:`~fingerprint_lm.tasks.training_record`).
"""

from __future__ import annotations

import logging
import os
import zipfile
from pathlib import Path
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from fingerprint_lm.distributor.read_predictor import check_predictor_codes, with_read_predictor
from fingerprint_lm.distributor.screening import fit_floors
from fingerprint_lm.errors import CheckpointError, ConfigError
from fingerprint_lm.lit import stages
from fingerprint_lm.methods import FingerprintMethod
from fingerprint_lm.methods.content_reader import (
    check_content_reader_settings,
    check_readout_attack_resolution,
    fit_content_reader,
    fit_settings,
)
from fingerprint_lm.models.checkpoint import load_fingerprint_model, save_fingerprint_model, shipped_checkpoint
from fingerprint_lm.models.vae import BaseVAESpec
from fingerprint_lm.report.plots import write_training_curve
from fingerprint_lm.tasks.training_record import record_training_config
from fingerprint_lm.tasks.wrapper import Task, TaskContext, flatten, is_global_zero, one_line_config_error

log = logging.getLogger(__name__)


def method_from_config(cfg: DictConfig) -> FingerprintMethod:
    """The ``method`` config group's entry, instantiated (``_target_``) with plain values."""
    try:
        return instantiate(cfg.method, _convert_="all")
    except InstantiationException as exc:
        error = one_line_config_error(exc)
        # the method's own check speaks for itself; Hydra's (e.g. +method.foo=1) says which group
        raise error if error is exc.__cause__ else ConfigError(f"method: {error}") from exc


def trainer_factory(cfg: DictConfig, **fixed):
    """A function building Lightning Trainers from ``cfg.trainer``: ``fixed`` arguments, and each
    call's own (a stage's) on top."""

    def make_trainer(**overrides):
        return instantiate(cfg.trainer, **{**fixed, **overrides})

    return make_trainer


def make_trainer_factory(cfg: DictConfig, context: TaskContext):
    """The training task's Trainers: the ``logger`` and ``callbacks`` groups' (loggers opened once)."""
    loggers = context.open_loggers(cfg)
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    return trainer_factory(cfg, logger=loggers or False, callbacks=callbacks)


def quiet_trainer_factory(cfg: DictConfig, **fixed):
    """Trainers with no logger, callbacks or checkpoints, for a training inside another task (the
    sweep's per-length model) or a script's run; ``fixed`` on top."""
    return trainer_factory(cfg, **{"logger": False, "callbacks": [], "enable_checkpointing": False, **fixed})


def model_spec(cfg: DictConfig) -> BaseVAESpec:
    """The ``model`` config group's entry, instantiated (``_target_``) and so range-checked."""
    if OmegaConf.is_missing(cfg.model, "path"):
        raise ConfigError("model.path is required: a local diffusers VAE folder (e.g. model.path=/data/sd2/vae)")
    try:
        return instantiate(cfg.model, _convert_="all")
    except InstantiationException as exc:
        error = one_line_config_error(exc)
        raise error if error is exc.__cause__ else ConfigError(f"model: {error}") from exc


def train_from_config(cfg: DictConfig, vae, datamodule, make_trainer, ckpt_path: str | None = None, seed=None,
                      init_model=None, first_cycle_dir: Path | None = None, method: FingerprintMethod | None = None):
    """:func:`stages.train_fingerprint` with ``fingerprint_bits``, the ``method`` and the decoder
    settings of ``model.*`` from ``cfg`` (the training run and the sweep's per-length models);
    ``init_model``: a trained model to continue from (``init_from``).

    With ``method.second_cycle`` the trained model then trains on for that cycle (or each of a list
    of cycles, in order), as ``init_from`` would continue it; a cycle whose loss reads the content
    reader fits that reader to the model first. ``first_cycle_dir``: where the first cycle's model is
    kept (rank 0 writes it); a run that finds it there (a rerun after a kill) skips the first cycle
    and restarts the later ones. ``method``: ``cfg.method`` as the caller already built it."""
    spec = model_spec(cfg)
    method = method_from_config(cfg) if method is None else method
    check_readout_attack_resolution(method, int(cfg.data.resolution))
    if method.content_reader is not None:  # fitted after training: checked before it, model built or continued
        check_content_reader_settings(method.content_reader, int(cfg.fingerprint_bits))
    seed = cfg.seed if seed is None else seed

    def run(method, vae, ckpt_path, init_model, make_trainer=make_trainer, read_with="extractor"):
        return stages.train_fingerprint(
            vae, int(cfg.fingerprint_bits), datamodule, make_trainer, method=method,
            ckpt_path=ckpt_path, seed=seed, gradient_checkpointing=spec.gradient_checkpointing,
            calibration_batch_size=spec.calibration_batch_size, init_model=init_model, read_with=read_with)

    cycles = method.later_cycles()
    if not cycles:
        return run(method, vae, ckpt_path, init_model)
    history: list[dict] = []
    if first_cycle_dir is not None and (first_cycle_dir / "fingerprint.json").is_file():
        log.info("second cycle: the first cycle's model is at %s; training the second from it", first_cycle_dir)
        model, seconds = load_fingerprint_model(first_cycle_dir), 0.0
    else:
        model, module, facts = run(method, vae, ckpt_path, init_model)
        history, seconds = module.history, facts["train_seconds"]
        if first_cycle_dir is not None and is_global_zero():  # recorded as the one-cycle run it was, not evaluated
            record_training_config(model, cfg, facts)
            model.meta["recipe"].pop("second_cycle")
            save_fingerprint_model(model, first_cycle_dir)
    steps_before = method.steps
    for cycle, read_with in cycles:
        if read_with == "content_reader":  # the reader the cycle's loss reads, fitted to the model as it is now
            fit_method_content_reader(method, model, datamodule, after_fit_device(cfg), for_cycle=True)
        log.info("next cycle: %d steps from the %d-step model, the loss read by its %s", cycle.steps, steps_before,
                 read_with)
        # the trainer config's max_steps is method.steps (conf/trainer/): each later cycle's is its own
        model, module, facts = run(cycle, model.vae, None, model, read_with=read_with,
                                   make_trainer=lambda steps=cycle.steps, **overrides: make_trainer(
                                       **{"max_steps": steps, **overrides}))
        # one curve over every cycle
        elapsed = history[-1]["elapsed_s"] if history else 0.0
        history += [{**row, "step": row["step"] + steps_before, "elapsed_s": row["elapsed_s"] + elapsed}
                    for row in module.history]
        steps_before += cycle.steps
        seconds += facts["train_seconds"]
    module.history = history
    # the record's steps are the first cycle's (the sweep matches method.steps); the later cycles'
    # total is recorded beside them
    facts.update({"steps": method.steps, "second_cycle_steps": steps_before - method.steps, "train_seconds": seconds})
    return model, module, facts


def init_checkpoint(cfg: DictConfig) -> Path | None:
    """The checkpoint folder ``init_from`` names: ``shipped`` is the method's shipped checkpoint."""
    if cfg.get("init_from") is None:
        return None
    if str(cfg.init_from) == "shipped":
        return shipped_checkpoint(cfg.method.checkpoint_name)
    folder = Path(str(cfg.init_from)).expanduser()
    if not (folder / "fingerprint.json").is_file():
        raise ConfigError(f"init_from={cfg.init_from}: no fingerprint checkpoint there (fingerprint.json missing); "
                          "give a trained model's folder (<run>/fingerprint_model) or init_from=shipped")
    return folder


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


def _check(cfg: DictConfig) -> None:
    """Every cheap check before anything trains or is written (the top-level keys: run_task's)."""
    method_from_config(cfg)
    model_spec(cfg)
    init_checkpoint(cfg)
    _predictor_codes(cfg)


def _predictor_codes(cfg: DictConfig) -> int:
    """How many codes' probe reads the read predictor is fitted on after training (0: none)."""
    # 0 where a config has no such key (one composed before it existed, or built by hand in a test)
    return check_predictor_codes("eval.issue_predictor_codes", cfg.eval.get("issue_predictor_codes", 0))


def train(cfg: DictConfig, context: TaskContext) -> dict[str, Any]:
    _check(cfg)
    output_dir = context.output_dir
    output_dir.mkdir(parents=True, exist_ok=True)
    datamodule = instantiate(cfg.data)
    make_trainer = make_trainer_factory(cfg, context)
    make_trainer(logger=False, callbacks=[])  # a bad trainer.* value fails now, before any training
    init_model, init_dir = None, init_checkpoint(cfg)
    if init_dir is None:
        vae, vae_facts = stages.prepare_base_vae(model_spec(cfg), cfg.paths.cache_dir, datamodule, make_trainer)
    else:  # the checkpoint's own trained shared decoder (and the base as it was, for fidelity)
        init_model = load_fingerprint_model(init_dir)
        vae, vae_facts = init_model.vae, {"base_vae": str(init_dir / "base_vae"), "init_from": str(init_dir)}
        log.info("continuing from the trained model at %s", init_dir)
    ckpt_path = resume_checkpoint(output_dir / "checkpoints" / "last.ckpt") if cfg.resume else None
    if ckpt_path:
        log.info("resuming from %s", ckpt_path)
    method = method_from_config(cfg)
    model, module, train_facts = train_from_config(cfg, vae, datamodule, make_trainer, ckpt_path=ckpt_path,
                                                   init_model=init_model, method=method,
                                                   first_cycle_dir=output_dir / "first_cycle_model")
    if not is_global_zero():
        # strategy=ddp and SLURM run this whole task on every rank: rank 0 alone evaluates and
        # writes the outputs (with ddp_spawn this is the main process, after fit returned).
        return {"fingerprint_bits": int(cfg.fingerprint_bits), **train_facts, **vae_facts}
    write_training_curve(module.history, output_dir / "training_curve.csv", output_dir / "training_curve.png")
    device = after_fit_device(cfg)
    content_reader = fit_method_content_reader(method, model, datamodule, device)  # evaluated with it, as the
    # distributor reads
    eval_metrics = stages.evaluate_fingerprint(model, datamodule.test_dataloader(), cfg.eval.max_images)
    metrics: dict[str, Any] = {"fingerprint_bits": int(cfg.fingerprint_bits), **eval_metrics, **train_facts,
                               **vae_facts, **content_reader}
    record_training_config(model, cfg, metrics)
    screen = method.issue_screen
    if screen is not None:  # the floors task=issue screens this checkpoint's codes with (distributor/screening.py)
        floors = fit_floors(model, **screen, device=device)
        if predictor_codes := _predictor_codes(cfg):  # and the read predictor its default screen uses
            floors = _with_predictor(model, floors, predictor_codes, metrics, device)  # (distributor/issue_screens.py)
        model.meta["issue_screen"] = metrics["issue_screen"] = floors
    metrics["checkpoint"] = str(save_fingerprint_model(model, output_dir / "fingerprint_model"))
    if cfg.export_checkpoint:
        save_fingerprint_model(model, cfg.paths.export_dir)
        metrics["exported_to"] = str(cfg.paths.export_dir)
    for logger in context.loggers:
        logger.log_metrics({f"eval/{k}": v for k, v in flatten(metrics).items() if isinstance(v, float | int)})
    return metrics


def fit_method_content_reader(method: FingerprintMethod, model, datamodule, device: str | torch.device = "cpu",
                              for_cycle: bool = False) -> dict[str, dict[str, float]]:
    """Fit pnm's content reader (``method.content_reader``) on the training stream:
    ``{"content_reader": its figures}`` for the run's metrics (which the checkpoint records), or
    ``{}`` when the method fits none. It decodes and reads on ``device`` (:func:`after_fit_device`); the
    model comes back where it was. ``for_cycle``: the reader a later cycle's loss reads
    (``cycle_statistics``; methods/content_reader.py: fit_settings)."""
    settings = getattr(method, "content_reader", None)
    if not settings:
        return {}
    log.info("fitting the content reader (%s)", settings)
    images = (batch["image"] for batch in datamodule.train_dataloader())
    home = next(model.vae.parameters()).device
    model.to(device)
    try:
        return {"content_reader": fit_content_reader(model, images, **fit_settings(settings, for_cycle))}
    finally:
        model.to(home)  # the evaluation and the checkpoint's writing run on the CPU copy


def after_fit_device(cfg: DictConfig) -> torch.device:
    """Where the work around fit() decodes and reads: the content reader's fit (about 14k images with
    pnm.yaml's settings) and the screen's probe reads (the read predictor's 3000 codes x 64 images),
    each days of a CPU at SD's size. The CPU when the trainer is told to run there
    (``trainer.accelerator=cpu``) or there is no GPU, else this rank's GPU (``LOCAL_RANK``, or SLURM's
    ``SLURM_LOCALID``: under DDP every rank fits the reader a later cycle reads, each on its own)."""
    if str(cfg.trainer.get("accelerator", "auto")) == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    rank = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))
    return torch.device("cuda", rank % torch.cuda.device_count())


def _with_predictor(model, floors: dict[str, Any], codes: int, metrics: dict[str, Any],
                    device: str | torch.device) -> dict[str, Any]:
    """The floors with a read predictor fitted to them; a fit that finds nothing to predict (no code
    clears the floors) is a warning, not the end of a training run: the checkpoint is saved with the
    floors alone, and task=issue screens it on the probe."""
    try:
        return with_read_predictor(model, floors, codes, device=device)
    except ConfigError as error:
        log.warning("no read predictor recorded: %s", error)
        metrics["issue_predictor_error"] = str(error)
        return floors


def _summary(metrics: dict[str, Any], json_path: Path | None) -> None:
    log.info("metrics: bit_acc=%.4f psnr=%.2f ssim=%.4f (%s)", metrics["bit_acc"], metrics["psnr"],
             metrics["ssim"], json_path)


TASK = Task("train", train, json_path=lambda cfg: Path(cfg.paths.output_dir) / "metrics.json",
            summarize=_summary, sort_keys=True)
