"""The collusion sweep: one grid point (ACT type x attack x colluders) -> ``metrics.json``.

A grid point issues ``colluders`` fresh users (random codes, one ACT seed each), builds their copies
with :func:`~fingerprint_lm.distributor.copies.personal_tensors`, applies the point's attack and
decodes held-out procedural images with the result. The attack is one of

- ``none``: the (first) copy itself;
- a merge of the ``c`` copies (:data:`~fingerprint_lm.attacks.collusion.MERGES`: ``average``,
  ``aligned_average`` (the adaptive colluder), ``max_abs``, ...): state dicts and bias maps merged
  together by the merge (stream ACT permutes the bias map's channels with the last segment);
- an image attack (:data:`~fingerprint_lm.attacks.image.IMAGE_ATTACKS`) on the copy's outputs;
- a model attack on the (first) copy's tensors, bias map included (the user holds both files):
  ``weight_noise`` (relative std), ``prune`` (fraction), ``quantize_int8|fp16|bf16``,
  ``finetune`` (steps of reconstruction-only fine-tuning);
- ``estimate_remove``: removal by estimation from the copy's own outputs, period = the tile size.

Hydra's basic sweeper takes the cartesian product of its lists, so attack, strength and colluder
count travel as one ``sweep.case`` string (:func:`parse_case`): ``none_c1``, ``average_c3``,
``aligned_average_c2``, ``jpeg_q50``, ``gaussian_blur_s1``, ``weight_noise_0.05``, ``prune_0.3``,
``quantize_int8``, ``finetune_50``, ``estimate_remove``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from fingerprint_lm.attacks import model as model_attacks
from fingerprint_lm.attacks.collusion import MERGES, merge_copies
from fingerprint_lm.attacks.image import IMAGE_ATTACKS, SIZE_CHANGING
from fingerprint_lm.data.synthetic import ProceduralImages
from fingerprint_lm.devices import resolve_device
from fingerprint_lm.distributor.copies import attach_bias_map, personal_tensors
from fingerprint_lm.errors import ConfigError
from fingerprint_lm.metrics.bits import match_threshold
from fingerprint_lm.metrics.fid import frechet_distance_proxy
from fingerprint_lm.metrics.quality import psnr, ssim
from fingerprint_lm.models.act import ACT_TYPES
from fingerprint_lm.models.checkpoint import FingerprintModel, recorded_method
from fingerprint_lm.registry.store import CodeIndex
from fingerprint_lm.registry.tracing import trace
from fingerprint_lm.storage import atomic_write_text, config_hash

log = logging.getLogger(__name__)

MODEL_ATTACKS: tuple[str, ...] = (
    "weight_noise",
    "prune",
    "quantize_int8",
    "quantize_fp16",
    "quantize_bf16",
    "finetune",
)
OUTPUT_ATTACKS: tuple[str, ...] = ("estimate_remove",)
ATTACKS: tuple[str, ...] = ("none", *MERGES, *IMAGE_ATTACKS, *MODEL_ATTACKS, *OUTPUT_ATTACKS)
# Held-out images of the sweep: a stream seed no training, validation, test or fid_proxy set uses
# (those are run seed + 0 / 1_000_003 / 2_000_003, and 10_000 + proxy seed).
SWEEP_IMAGE_SEED = 5_000_011
FINETUNE_IMAGE_SEED = 6_000_013  # the attacker's own fine-tuning images
# Points in a sweep summary, in this order (the grid keys first).
GRID_KEYS: tuple[str, ...] = ("method", "fingerprint_bits", "act", "attack", "attack_strength", "colluders")
_STRENGTH = re.compile(r"^[a-z]?(\d+(?:\.\d+)?)$")
_COLLUDERS = re.compile(r"^c(\d+)$")


# -- grid cases -----------------------------------------------------------------------------------
def parse_case(case: str) -> tuple[str, float | None, int]:
    """``"average_c3"`` -> ``("average", None, 3)``, ``"jpeg_q50"`` -> ``("jpeg", 50.0, 1)``.

    The case is an attack name followed by ``_``-separated tokens: ``c<N>`` sets the number of
    colluders (default 1), a number with an optional one-letter unit prefix (``q50``, ``s1``,
    ``0.05``) the attack strength. Merges need ``c >= 2``; every other attack works on one copy.
    """
    text = str(case)
    names = sorted((n for n in ATTACKS if text == n or text.startswith(n + "_")), key=len, reverse=True)
    if not names:
        raise ConfigError(
            f"unknown sweep case {case!r}: expected <attack>[_<strength>][_c<N>] with attack one "
            f"of {', '.join(ATTACKS)}"
        )
    attack = names[0]
    strength, colluders = None, 1
    for token in filter(None, text[len(attack) :].split("_")):
        if match := _COLLUDERS.match(token):
            colluders = int(match.group(1))
        elif (match := _STRENGTH.match(token)) and strength is None:
            strength = float(match.group(1))
        else:
            raise ConfigError(f"sweep case {case!r}: cannot read {token!r} (c<N> or a strength)")
    check_point(attack, strength, colluders)
    return attack, strength, colluders


def check_point(attack: str, strength: float | None, colluders: int) -> None:
    if attack not in ATTACKS:
        raise ConfigError(f"unknown attack {attack!r}; expected one of {', '.join(ATTACKS)}")
    if isinstance(colluders, bool) or not isinstance(colluders, int) or colluders < 1:
        raise ConfigError(f"colluders must be a positive integer, got {colluders!r}")
    if attack in MERGES and colluders < 2 and attack != "average":
        raise ConfigError(f"merge {attack!r} needs at least 2 colluders, got {colluders}")
    if attack not in MERGES and colluders != 1:
        raise ConfigError(f"attack {attack!r} works on one copy; colluders must be 1, got {colluders}")
    needs_strength = (
        attack in IMAGE_ATTACKS and attack != "combined" or attack in ("weight_noise", "prune", "finetune")
    )
    if needs_strength and strength is None:
        raise ConfigError(f"attack {attack!r} needs a strength (e.g. {attack}_0.5)")


# -- decoding with a copy's tensors ---------------------------------------------------------------
def build_decoder(
    vae_config, state: dict[str, torch.Tensor], bias_map: torch.Tensor | None, site: str | None
):
    """A stock ``AutoencoderKL`` with ``state`` loaded and, with a bias map, the site swapped for a
    ``BiasMapGroupNorm`` (what :func:`~fingerprint_lm.distributor.copies.load_copy` builds)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_config(vae_config)
    vae.load_state_dict(state)
    if bias_map is not None:
        attach_bias_map(vae, bias_map, site)
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def _decode(
    vae, latents: torch.Tensor, device: str | torch.device = "cpu", batch_size: int = 64
) -> torch.Tensor:
    """Decode on ``device`` (the heavy part of a point at SD scale), return CPU images."""
    vae.to(device)
    return torch.cat(
        [
            vae.decode(latents[i : i + batch_size].to(device)).sample.float().cpu()
            for i in range(0, len(latents), batch_size)
        ]
    )


@torch.no_grad()
def _encode(
    vae, images: torch.Tensor, device: str | torch.device = "cpu", batch_size: int = 64
) -> torch.Tensor:
    """Latent modes of ``images`` computed on ``device``; ``vae`` is moved back to the CPU after,
    because the copies' tensors are built from its CPU state dict."""
    try:
        vae.to(device)
        return torch.cat(
            [
                vae.encode(images[i : i + batch_size].to(device)).latent_dist.mode().cpu()
                for i in range(0, len(images), batch_size)
            ]
        )
    finally:
        vae.to("cpu")


@torch.no_grad()
def _logits(
    extractor, images: torch.Tensor, device: str | torch.device = "cpu", batch_size: int = 64
) -> torch.Tensor:
    """Extractor logits computed on ``device``, returned on the CPU (the extractor goes back too)."""
    try:
        extractor.to(device)
        return torch.cat(
            [
                extractor(images[i : i + batch_size].to(device)).float().cpu()
                for i in range(0, len(images), batch_size)
            ]
        )
    finally:
        extractor.to("cpu")


def _user_seed(seed: int, index: int) -> int:
    return int(np.random.default_rng([int(seed), 1, index]).integers(0, 2**62))


def _attack_tensors(attack: str, strength, state, bias_map, site, generator):
    """A state-dict attack on the copy's tensors and its bias map together (the user holds both)."""
    key = f"{site}.bias_map"
    tensors = dict(state)
    if bias_map is not None:
        tensors[key] = bias_map
    if attack == "weight_noise":
        out = model_attacks.weight_noise(tensors, float(strength), generator)
    elif attack == "prune":
        out = model_attacks.magnitude_prune(tensors, float(strength))
    else:
        out = model_attacks.quantize_roundtrip(tensors, attack.removeprefix("quantize_"))
    new_bias = out.pop(key) if bias_map is not None else None
    return out, new_bias


# -- one grid point -------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_point(
    model: FingerprintModel,
    fingerprint_bits: int,
    act: str,
    attack: str,
    attack_strength: float | None,
    colluders: int,
    n_images: int,
    seed: int,
    fid_net=None,
    n_innocents: int = 1000,
    fpr: float = 1e-6,
    tracing_fpr: float = 1e-3,
    scale_range: tuple[float, float] = (0.25, 4.0),
    finetune_lr: float = 1e-4,
    act_scope: str = "stream",
    images: torch.Tensor | None = None,
    tune_images: torch.Tensor | None = None,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Evaluate one grid point; returns the grid keys and the metrics (plain floats and ints).

    Parameters:
        model: the distributor's trained model (its ``vae`` is the base VAE).
        fingerprint_bits: must equal the model's code length.
        act: the colluders' ACT type (:data:`~fingerprint_lm.models.act.ACT_TYPES`).
        attack, attack_strength, colluders: see :func:`parse_case` and the module docstring.
        n_images: held-out images decoded by the attacked model (and by the base decoder).
        seed: draws the colluders' and innocents' codes, ACT seeds and attack randomness.
        fid_net: the fid_proxy feature net; None skips ``fid_proxy``/``fid_proxy_base``.
        n_innocents: random innocent codes in the registry beside the colluders'.
        fpr: false-accusation probability of attribution (Bonferroni over the registry) and of
            the per-image detection test (one code, no correction).
        tracing_fpr: false-accusation probability of colluder tracing.
        images: held-out real images ``[n, 3, R, R]`` in [-1, 1] (e.g. COCO test images); None:
            ``n_images`` procedural images no training run has seen.
        tune_images: the fine-tuning attacker's own images; None: 256 other procedural images.
        device: where decoders and the extractor run (encoding, decoding, fine-tuning, reading the
            bits); the metrics themselves are computed on the CPU.
    """
    k = model.fingerprint_bits
    if fingerprint_bits != k:
        raise ConfigError(f"fingerprint_bits={fingerprint_bits} but the model has {k}-bit codes")
    if act not in ACT_TYPES:
        raise ConfigError(f"unknown ACT type {act!r}; expected one of {', '.join(ACT_TYPES)}")
    check_point(attack, attack_strength, colluders)
    if n_images < 2:
        raise ConfigError(f"n_images must be >= 2, got {n_images}")
    start = time.perf_counter()
    rng = np.random.default_rng([int(seed), 0])
    codes = rng.integers(0, 2, size=(colluders + n_innocents, k), dtype=np.uint8)
    user_ids = [f"colluder{i}" for i in range(colluders)] + [f"innocent{i}" for i in range(n_innocents)]
    index = CodeIndex.from_bits(user_ids, codes)
    generator = torch.Generator().manual_seed(int(seed))

    copies = [
        personal_tensors(
            model, codes[i], act, _user_seed(seed, i) if act != "none" else None, scale_range, act_scope
        )
        for i in range(colluders)
    ]
    site = copies[0][2]
    config = model.vae.config
    resolution = int(model.meta.get("resolution", 32))
    if images is None:
        real = torch.stack(
            [
                ProceduralImages(resolution, SWEEP_IMAGE_SEED, n_images).sample(i)["image"]
                for i in range(n_images)
            ]
        )
    else:
        real = images[:n_images].float()
        if real.dim() != 4 or tuple(real.shape[1:]) != (3, resolution, resolution) or len(real) < 2:
            raise ConfigError(
                f"sweep images must be [n>=2, 3, {resolution}, {resolution}] (the model's resolution), "
                f"got {tuple(real.shape)}"
            )
    latents = _encode(model.vae, real, device)
    base_outputs = _decode(build_decoder(config, model.vae.state_dict(), None, None), latents, device)

    state, bias_map = copies[0][0], copies[0][1]
    if attack in MERGES:
        # The bias map is one more tensor of each copy: merged with the rest (and aligned by the
        # adaptive colluder, since stream ACT permutes its channels with the last segment).
        key = f"{site}.bias_map"
        merged = merge_copies(
            attack,
            [{**c[0], key: c[1]} if c[1] is not None else c[0] for c in copies],
            generator,
            num_groups=int(config.norm_num_groups),
        )
        bias_map = merged.pop(key, None)
        state = merged
    elif attack in ("weight_noise", "prune") or attack.startswith("quantize_"):
        state, bias_map = _attack_tensors(attack, attack_strength, state, bias_map, site, generator)
    decoder = build_decoder(config, state, bias_map, site)
    if attack == "finetune":
        if tune_images is None:
            tune_images = torch.stack(
                [
                    ProceduralImages(resolution, FINETUNE_IMAGE_SEED, 256).sample(i)["image"]
                    for i in range(256)
                ]
            )
        decoder.to(device)
        with torch.enable_grad():
            decoder = model_attacks.finetune_reconstruction(
                decoder, int(attack_strength), finetune_lr, tune_images, batch_size=16, generator=generator
            )
    outputs = _decode(decoder, latents, device)
    reference = base_outputs  # what quality is measured against: the same cut for crops and shifts
    if attack in IMAGE_ATTACKS:
        if attack in SIZE_CHANGING:
            replay = torch.Generator()  # the attack's own random draws, replayed on the base outputs
            replay.set_state(generator.get_state())
            reference = IMAGE_ATTACKS[attack](base_outputs, attack_strength, replay)
        outputs = IMAGE_ATTACKS[attack](outputs, attack_strength, generator)
    elif attack == "estimate_remove":
        tile = int(getattr(model.pnm, "tile_size", model.meta.get("pnm", {}).get("tile_size", 16)))
        outputs = model_attacks.estimate_and_remove(outputs, period=tile)

    logits = _logits(model.extractor, outputs, device)
    probs = torch.sigmoid(logits).double().numpy()
    hard = (logits > 0).numpy().astype(np.uint8)
    per_colluder = [(hard == codes[i][None]).mean() for i in range(colluders)]
    ids = index.identify_many(probs, fpr=fpr)
    colluder_ids = set(user_ids[:colluders])
    attributed = [r["accused"] and r["user_id"] in colluder_ids for r in ids]
    threshold = match_threshold(k, fpr, 1)
    matches = (hard == codes[0][None]).sum(axis=1)
    base_hard = (_logits(model.extractor, base_outputs, device) > 0).numpy().astype(np.uint8)
    base_matches = (base_hard == codes[0][None]).sum(axis=1)
    suspects = trace(probs, index, fpr=tracing_fpr, top=colluders)
    accused = [s["user_id"] for s in suspects if s["accused"]]

    metrics: dict[str, Any] = {
        "method": model.method,
        "fingerprint_bits": k,
        "act": act,
        "act_scope": act_scope,
        "attack": attack,
        "attack_strength": None if attack_strength is None else float(attack_strength),
        "colluders": int(colluders),
        "n_images": int(len(real)),
        "registry_size": len(index),
        "bit_acc": float(np.mean(per_colluder)),
        "bit_acc_min": float(np.min(per_colluder)),
        "bit_acc_max": float(np.max(per_colluder)),
        "attribution_acc": float(np.mean(attributed)),
        "tpr_at_fpr1e-6": float(np.mean(matches >= threshold)),
        "false_positives": float(np.mean(base_matches >= threshold)),
        "tracing_caught": sum(u in colluder_ids for u in accused),
        "tracing_innocents_accused": sum(u not in colluder_ids for u in accused),
        "psnr": float(psnr(outputs, reference).mean()),
        "ssim": float(ssim(outputs, reference)),
        "fid_proxy": None,
        "fid_proxy_base": None,
    }
    if fid_net is not None and outputs.shape[-2:] == real.shape[-2:]:  # no proxy across image sizes
        metrics["fid_proxy"] = frechet_distance_proxy(outputs, real, fid_net)
        metrics["fid_proxy_base"] = frechet_distance_proxy(base_outputs, real, fid_net)
    metrics["seconds"] = time.perf_counter() - start
    return metrics


# -- which trained model a point uses ------------------------------------------------------------
def training_record(cfg: DictConfig) -> dict[str, Any]:
    """What a trained fingerprint model's ``fingerprint.json`` records of its training config."""
    from fingerprint_lm.pipeline.run import method_from_config  # run.py dispatches here

    return {
        "fingerprint_bits": int(cfg.fingerprint_bits),
        **method_from_config(cfg).record(),
        "resolution": int(cfg.data.resolution),
        "steps": int(cfg.method.steps),
    }


def _recorded(meta: dict[str, Any]) -> dict[str, Any]:
    return {
        "fingerprint_bits": meta.get("fingerprint_bits"),
        "method": recorded_method(meta),
        "pnm": meta.get("pnm"),
        "extractor": meta.get("extractor"),
        "resolution": meta.get("resolution"),
        "steps": meta.get("metrics", {}).get("steps"),
    }


def sweep_model_dir(cfg: DictConfig) -> tuple[Path, str]:
    """The trained model a sweep point evaluates, and where it came from.

    ``sweep.checkpoint`` set: that folder (its length must be ``fingerprint_bits``): ``"given"``.
    Otherwise the shipped embedded checkpoint when its recorded training config
    (:func:`training_record`: length, PNM, extractor, resolution, steps) matches the sweep's:
    ``"shipped"``. Otherwise a model trained once for this training config on the shipped
    checkpoint's base VAE, cached under ``paths.cache_dir/sweep_models/<hash>`` and reused by every
    ACT/attack/colluder point: ``"trained"`` for the point that trained it, ``"cached"`` after. A
    file lock makes parallel jobs (submitit) wait for one training instead of repeating it.
    """
    from fingerprint_lm.distributor.tasks import checkpoint_code_length
    from fingerprint_lm.models.checkpoint import SHIPPED_CHECKPOINT, shipped_checkpoint

    bits = cfg.fingerprint_bits
    if isinstance(bits, bool) or not isinstance(bits, int) or bits <= 0:
        raise ConfigError(f"fingerprint_bits must be a positive integer, got {bits!r}")
    if cfg.sweep.checkpoint:
        directory = Path(cfg.sweep.checkpoint)
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
        return directory, "given"
    record = training_record(cfg)
    shipped = shipped_checkpoint(str(cfg.method.checkpoint_name))
    if (shipped / "fingerprint.json").is_file() and _recorded(json.loads((shipped / "fingerprint.json").read_text())) == record:
        return shipped, "shipped"
    base_vae_dir = SHIPPED_CHECKPOINT / "base_vae"  # every method trains on the same base VAE
    target = sweep_model_cache_dir(cfg, record, base_vae_dir)
    if (target / "fingerprint.json").is_file():
        return target, "cached"
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f"{target.name}.lock", "w") as lock:
        import fcntl

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
    }
    return Path(cfg.paths.cache_dir) / "sweep_models" / config_hash(full)


def train_sweep_model(cfg: DictConfig, target: Path, base_vae_dir: Path) -> None:
    """Train the fingerprint model of ``cfg`` (``fingerprint_bits``, ``method``, ``data``) on the base
    VAE in ``base_vae_dir``, evaluate it on held-out images and save it atomically to ``target``."""
    from hydra.utils import instantiate

    from fingerprint_lm.models.checkpoint import save_fingerprint_model
    from fingerprint_lm.models.vae import load_vae
    from fingerprint_lm.pipeline import stages
    from fingerprint_lm.pipeline.run import (  # run.py dispatches here
        record_training_config,
        train_from_config,
    )

    def make_trainer(**overrides):
        kwargs = {
            "logger": False,
            "callbacks": [],
            "enable_checkpointing": False,
            "default_root_dir": str(target.parent),
            **overrides,
        }
        return instantiate(cfg.trainer, **kwargs)

    bits = int(cfg.fingerprint_bits)
    log.info(
        "sweep: training a %d-bit fingerprint model (%d steps), cached at %s", bits, cfg.method.steps, target
    )
    datamodule = instantiate(cfg.data)
    model, _, facts = train_from_config(
        cfg, load_vae(base_vae_dir), datamodule, make_trainer, seed=int(cfg.sweep.train_seed)
    )
    quality = stages.evaluate_fingerprint(model, datamodule.test_dataloader(), int(cfg.eval.max_images))
    record_training_config(model, cfg, {**quality, "steps": facts["steps"]})
    model.meta["metrics"]["train_seconds"] = facts["train_seconds"]
    model.meta["trained_by"] = "collusion sweep (fingerprint_lm.pipeline.sweep.train_sweep_model)"
    save_fingerprint_model(model, target)
    log.info(
        "sweep: %d-bit model trained in %.0f s: bit_acc %.4f, PSNR %.2f dB",
        bits,
        facts["train_seconds"],
        quality["bit_acc"],
        quality["psnr"],
    )


def sweep_images(cfg: DictConfig, resolution: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``sweep.images``: ``procedural`` (None, None: evaluate_point draws its own) or ``data``: the
    first ``sweep.n_images`` test images of ``cfg.data`` (e.g. ``data=coco``) and 256 training
    images for the fine-tuning attacker, at the model's resolution."""
    source = str(cfg.sweep.images)
    if source == "procedural":
        return None, None
    if source != "data":
        raise ConfigError(f"sweep.images must be procedural or data, got {source!r}")
    from hydra.utils import instantiate

    from fingerprint_lm.methods.base import collect_images

    if int(cfg.data.resolution) != resolution:
        raise ConfigError(f"data.resolution={cfg.data.resolution} but the model was trained at {resolution}")
    datamodule = instantiate(cfg.data)
    return (
        collect_images(datamodule.test_dataloader(), int(cfg.sweep.n_images)),
        collect_images(datamodule.train_dataloader(), 256),
    )


# -- the Hydra task -------------------------------------------------------------------------------
def run_sweep_point(cfg: DictConfig) -> dict[str, Any]:
    """``task=sweep_point``: evaluate ``cfg.sweep.case`` for ``cfg.act.type``; write ``metrics.json``
    in the job dir, or return the existing one when its ``point_key`` matches (a re-run skips it)."""
    from hydra.utils import instantiate

    from fingerprint_lm.metrics.fid import train_proxy_feature_net
    from fingerprint_lm.models.checkpoint import load_fingerprint_model

    settings = cfg.sweep
    bits = cfg.fingerprint_bits
    directory, model_source = sweep_model_dir(cfg)
    attack, strength, colluders = parse_case(settings.case)
    act = cfg.act.type
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    point = {
        "method": str(cfg.method.name),
        "fingerprint_bits": bits,
        "act": act,
        "case": str(settings.case),
        "seed": int(cfg.seed),
        "n_images": int(settings.n_images),
        "n_innocents": int(settings.n_innocents),
        "fpr": float(settings.fpr),
        "tracing_fpr": float(settings.tracing_fpr),
        "scale_range": [float(cfg.act.scale_min), float(cfg.act.scale_max)],
        "act_scope": str(cfg.act.scope),
        "finetune_lr": float(settings.finetune_lr),
        "fid_proxy_steps": int(settings.fid_proxy_steps),
        "images": str(settings.images),
        "checkpoint": str(directory.resolve()),
        "checkpoint_meta": config_hash(json.loads((directory / "fingerprint.json").read_text())),
    }
    key = config_hash(point)
    metrics_path = output_dir / "metrics.json"
    if metrics_path.is_file():
        try:
            previous = json.loads(metrics_path.read_text())
        except json.JSONDecodeError:
            previous = {}
        if previous.get("point_key") == key:
            log.info("sweep point %s/%s already done (%s): skipped", act, settings.case, metrics_path)
            return previous

    os.environ.setdefault("WANDB_SILENT", "true")
    loggers = []
    if cfg.get("logger"):
        # one run per point, grouped by the sweep dir (the job dir is <sweep dir>/<job num>)
        overrides = {"group": output_dir.parent.name} if "group" in cfg.logger else {}
        loggers = [instantiate(cfg.logger, **overrides)]
    try:
        model = load_fingerprint_model(directory)
        resolution = int(model.meta.get("resolution", 32))
        fid_net = None
        if int(settings.fid_proxy_steps) > 0:
            fid_net = train_proxy_feature_net(
                resolution, steps=int(settings.fid_proxy_steps), cache_dir=cfg.paths.cache_dir
            )
        images, tune_images = sweep_images(cfg, resolution)
        torch.manual_seed(int(cfg.seed))
        metrics = evaluate_point(
            model,
            bits,
            act,
            attack,
            strength,
            colluders,
            int(settings.n_images),
            int(cfg.seed),
            fid_net,
            n_innocents=int(settings.n_innocents),
            fpr=float(settings.fpr),
            tracing_fpr=float(settings.tracing_fpr),
            scale_range=(float(cfg.act.scale_min), float(cfg.act.scale_max)),
            finetune_lr=float(settings.finetune_lr),
            act_scope=str(cfg.act.scope),
            images=images,
            tune_images=tune_images,
            device=resolve_device(settings.device, "sweep.device"),
        )
        metrics.update(
            {"case": str(settings.case), "point_key": key, "point": point, "model_source": model_source}
        )
        for logger in loggers:
            logger.log_metrics(
                {
                    f"sweep/{k}": v
                    for k, v in metrics.items()
                    if isinstance(v, int | float) and not isinstance(v, bool)
                }
            )
        atomic_write_text(metrics_path, json.dumps(metrics, indent=2, sort_keys=True))
        log.info(
            "sweep point act=%s case=%s: bit_acc=%.4f psnr=%.2f fid_proxy=%s (%.1f s)",
            act,
            settings.case,
            metrics["bit_acc"],
            metrics["psnr"],
            _fmt(metrics["fid_proxy"]),
            metrics["seconds"],
        )
        return metrics
    finally:
        from fingerprint_lm.pipeline.run import finish_wandb  # run.py dispatches here: import late

        finish_wandb(loggers)


def _fmt(value) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


class SummarizeSweep(Callback):
    """Hydra callback: write the sweep summary (:func:`~fingerprint_lm.report.tables.write_summary`)
    once every job of the multirun has finished."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from fingerprint_lm.report.tables import write_summary

        sweep_dir = Path(OmegaConf.select(config, "hydra.sweep.dir"))
        paths = write_summary(sweep_dir)
        log.info("sweep summary: %s", ", ".join(str(p) for p in paths))
