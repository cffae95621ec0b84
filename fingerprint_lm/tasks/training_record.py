"""What a trained fingerprint model records of its training, in one place: the record a config
asks for (:func:`training_record`), its write into the model's ``fingerprint.json``
(:func:`record_training_config`), its read back (:func:`recorded_training`) and the match the
collusion sweep takes a shipped checkpoint on (:func:`matches_shipped`)."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from fingerprint_lm.methods import FingerprintMethod
from fingerprint_lm.models.checkpoint import recorded_method


def training_recipe(cfg: DictConfig) -> dict[str, Any]:
    """The method's training settings that shape the trained model but are not needed to rebuild
    it: ``train`` (losses, learning rates, the worst-case term), ``augment``,
    ``detector_fit_samples`` and (pnm) ``bit_calibration_images`` and ``content_reader``. Recorded
    so that the sweep does not take a shipped checkpoint trained with another recipe (say
    ``method.train.wc_rho=0.002``) for the one it was asked for."""
    method = cfg.method
    recipe = {
        "train": OmegaConf.to_container(method.get("train", {}), resolve=True),
        "augment": OmegaConf.to_container(method.get("augment", {}), resolve=True),
        "detector_fit_samples": method.get("detector_fit_samples"),
    }
    # pnm's alone, and only since 2026-12-06: the other methods' records stay as they were shipped
    if method.get("bit_calibration_images") is not None:
        recipe["bit_calibration_images"] = method.bit_calibration_images
    if method.get("second_cycle") is not None:  # only when set: one-cycle records stay as they were shipped
        recipe["second_cycle"] = OmegaConf.to_container(method.second_cycle, resolve=True)
    if method.get("content_reader") is not None:  # likewise: records without one stay as they were shipped
        recipe["content_reader"] = OmegaConf.to_container(method.content_reader, resolve=True)
    if cfg.get("init_from") is not None:  # a fine-tune of another checkpoint is not a fresh training
        recipe["init_from"] = str(cfg.init_from)
    return recipe


def record_training_config(model, cfg: DictConfig, metrics: dict[str, Any]) -> None:
    """Write into ``model.meta`` what a checkpoint records of its training (length, resolution and
    :func:`training_recipe`; the method's record, PNM and extractor settings, is there since the
    method built the model) and its quality figures; the sweep matches checkpoints on these."""
    model.meta.update(
        {
            "fingerprint_bits": int(cfg.fingerprint_bits),
            "resolution": cfg.data.resolution,
            "recipe": training_recipe(cfg),
            "metrics": {k: v for k, v in metrics.items() if k in ("bit_acc", "psnr", "ssim", "steps")},
        }
    )
    if "content_reader" in metrics:  # pnm's content reader's fit (methods/content_reader.py), as fit_content_reader.py
        model.meta["content_reader"] = metrics["content_reader"]
    calibration = {k: v for k, v in metrics.items() if k.startswith("bit_slope_")}
    if calibration:  # pnm's per-bit calibration (methods/pnm.py: calibrate_bits), as fit_bit_slopes.py records it
        model.meta["bit_calibration"] = calibration


def training_record(cfg: DictConfig, method: FingerprintMethod) -> dict[str, Any]:
    """What a trained fingerprint model's ``fingerprint.json`` records of its training config."""
    return {
        "fingerprint_bits": int(cfg.fingerprint_bits),
        **method.record(),
        "resolution": int(cfg.data.resolution),
        "steps": int(cfg.method.steps),
        "recipe": training_recipe(cfg),
    }


def recorded_training(meta: dict[str, Any]) -> dict[str, Any]:
    """The same fields as :func:`training_record`, read back from a checkpoint's ``fingerprint.json``."""
    return {
        "fingerprint_bits": meta.get("fingerprint_bits"),
        "method": recorded_method(meta),
        "pnm": meta.get("pnm"),
        "extractor": meta.get("extractor"),
        "resolution": meta.get("resolution"),
        "steps": meta.get("metrics", {}).get("steps"),
        "recipe": meta.get("recipe"),
    }


def matches_shipped(meta: dict[str, Any], record: dict[str, Any]) -> bool:
    """Whether a shipped checkpoint's ``fingerprint.json`` (``meta``) records the training config
    ``record``. A checkpoint from before recipes were recorded (no ``recipe`` key) matches on the
    rest, as before: what it was trained with beyond that is not known."""
    recorded = recorded_training(meta)
    if recorded["recipe"] is None:
        recorded["recipe"] = record["recipe"]
    return recorded == record
