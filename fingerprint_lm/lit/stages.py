"""Stages of one experiment: base VAE -> train PNM + extractor -> evaluate.

Each stage takes plain arguments (no Hydra config) so tests and scripts can call it directly.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from copy import deepcopy
from pathlib import Path
from typing import Any

import lightning as L
import torch

from fingerprint_lm.attacks.cases import ROBUSTNESS_SUITE, image_case
from fingerprint_lm.data.datamodule import check_resolution
from fingerprint_lm.errors import ConfigError, check_int
from fingerprint_lm.lit.base_vae import BaseVAEModule
from fingerprint_lm.lit.fingerprinting import FingerprintModule
from fingerprint_lm.methods import FingerprintMethod
from fingerprint_lm.methods.base import COPY_TRAINERS
from fingerprint_lm.metrics.quality import psnr, ssim
from fingerprint_lm.models import augment as aug
from fingerprint_lm.models.checkpoint import FingerprintModel
from fingerprint_lm.models.content_reader import LossReader
from fingerprint_lm.models.vae import (
    BaseVAESpec,
    build_vae,
    decode_latents,
    downscale_factor,
    encode_latents,
    load_vae,
    parse_dtype,
)
from fingerprint_lm.storage import atomic_directory, config_hash

log = logging.getLogger(__name__)


# -- base VAE -----------------------------------------------------------------------------------
def prepare_base_vae(
    spec: BaseVAESpec,
    cache_dir: str | Path,
    datamodule: L.LightningDataModule,
    make_trainer: Callable[..., L.Trainer],
) -> tuple[Any, dict]:
    """Return the base VAE of ``spec`` and facts about it: built and pretrained here (cached by
    config hash) when ``spec.source == "config"``, or loaded from a local diffusers folder.

    ``spec.dtype`` is the dtype the weights are held in (None: float32); ``spec.freeze_encoder``
    keeps the encoder out of pretraining; ``spec.scaling_factor``, when given, must match the VAE's
    own (a guard against a folder of another model family: SD 1/2 use 0.18215, SDXL 0.13025)."""
    vae_config, pretrain, freeze_encoder = spec.vae_config, spec.pretrain, spec.freeze_encoder
    scaling_factor = spec.scaling_factor
    torch_dtype = parse_dtype(spec.dtype)
    if spec.source == "pretrained":
        vae = load_vae(spec.path, dtype=torch_dtype)
        facts = {"base_vae": str(spec.path), "base_vae_seconds": 0.0, "base_vae_cached": True}
        return vae, {**facts, **_vae_facts(vae, scaling_factor)}
    pretrain = dict(pretrain or {})
    key = config_hash({"vae": vae_config, "pretrain": pretrain, "resolution": datamodule.resolution})
    target = Path(cache_dir) / "base_vae" / key
    if freeze_encoder:  # another training, another cache entry (the default keeps existing keys)
        key = config_hash({"vae": vae_config, "pretrain": pretrain, "resolution": datamodule.resolution,
                           "freeze_encoder": True})
        target = Path(cache_dir) / "base_vae" / key
    if (target / "config.json").is_file():
        log.info("base VAE: cached at %s", target)
        vae = load_vae(target, dtype=torch_dtype)
        facts = {"base_vae": str(target), "base_vae_seconds": 0.0, "base_vae_cached": True}
        return vae, {**facts, **_vae_facts(vae, scaling_factor)}
    vae = build_vae(vae_config)
    check_resolution(datamodule.resolution, downscale_factor(vae))
    log.info("base VAE: pretraining %d steps (cached afterwards at %s)", pretrain.get("steps", 0), target)
    start = time.perf_counter()
    module = BaseVAEModule(vae, lr=pretrain.get("lr", 2e-3), kl_weight=pretrain.get("kl_weight", 1e-6),
                           freeze_encoder=freeze_encoder)
    trainer = make_trainer(max_steps=int(pretrain.get("steps", 1000)), logger=False, callbacks=[],
                           enable_checkpointing=False, limit_val_batches=0)
    trainer.fit(module, train_dataloaders=datamodule.train_dataloader())
    seconds = time.perf_counter() - start
    vae.eval()
    if trainer.is_global_zero:  # strategy=ddp / SLURM: every rank trained the same weights; one writes
        with atomic_directory(target) as tmp:
            vae.save_pretrained(tmp, safe_serialization=True)
    vae.to(torch_dtype)
    facts = {"base_vae": str(target), "base_vae_seconds": seconds, "base_vae_cached": False}
    return vae, {**facts, **_vae_facts(vae, scaling_factor)}


def _vae_facts(vae, scaling_factor: float | None) -> dict:
    """What metrics.json records about the base VAE; checks a pinned ``scaling_factor``."""
    own = float(vae.config.scaling_factor)
    if scaling_factor is not None and abs(float(scaling_factor) - own) > 1e-6:
        raise ConfigError(f"model.scaling_factor={scaling_factor} but the VAE's config.json says {own}")
    return {"vae_scaling_factor": own, "vae_dtype": str(vae.dtype).removeprefix("torch.")}


# -- fingerprint training -----------------------------------------------------------------------
def train_fingerprint(
    vae,
    fingerprint_bits: int,
    datamodule: L.LightningDataModule,
    make_trainer: Callable[..., L.Trainer],
    method: FingerprintMethod,
    ckpt_path: str | None = None,
    seed: int = 0,
    gradient_checkpointing: bool = False,
    calibration_batch_size: int = 256,
    init_model: FingerprintModel | None = None,
    read_with: str = "extractor",
) -> tuple[FingerprintModel, FingerprintModule, dict]:
    """Build ``method``'s PNM and extractor around ``vae``, run its pre-training hook (the carrier
    method's closed-form reader start), train with the worst-case objective, run its post-training
    hook (the pnm method's whitening). Returns the model, the module and facts.

    ``gradient_checkpointing`` recomputes the decoder's blocks in the backward pass (memory for
    compute; SD scale); ``calibration_batch_size`` is the images per decoder pass of the carrier
    calibration and detector fit. The encoder is frozen throughout (``FingerprintModule``).

    ``init_model``: a trained model of the same method and code length to continue from instead of
    a fresh one (a fine-tune, e.g. under augmentations): its shared decoder (``vae`` is ignored),
    PNM and reader train on, fidelity stays measured against its ``reference_vae``, and its reader,
    already whitened, skips the pre-training hook.

    ``read_with="content_reader"``: the fingerprint loss reads ``init_model``'s content reader
    instead of its extractor (a later cycle, ``FingerprintMethod.later_cycles``); the reader is
    fixed, its re-made images carry no gradient, and the post-training hook acts on the extractor."""
    check_int("fingerprint length", fingerprint_bits)
    check_resolution(datamodule.resolution, downscale_factor(vae))
    L.seed_everything(seed, workers=True, verbose=False)
    # A trained shared decoder moves away from the base: a copy of the base as it was stays the
    # fidelity reference of the evaluation, the sweep and the shipped checkpoint (reference_vae/).
    if init_model is None:
        reference_vae = deepcopy(vae).eval().requires_grad_(False) if method.train.get("train_decoder") else None
        model = method.build_model(vae, fingerprint_bits)
        model.reference_vae = reference_vae
    else:
        model = continued_model(init_model, method, fingerprint_bits)
    model.pnm.gradient_checkpointing = gradient_checkpointing
    module = FingerprintModule(model.vae, model.pnm, _loss_reader(model, read_with),
                               augment=aug.AugmentConfig(**method.augment),
                               calibration_batch_size=calibration_batch_size,
                               reference_vae=None if init_model is None else model.reference_vae, **method.train)
    trainer = make_trainer()
    start = time.perf_counter()
    facts: dict[str, Any] = {}
    # The hooks run before fit(), on the training device rather than the CPU (an SD decoder
    # over 4096 images is hours on a CPU), then hand the module back on the CPU as fit()
    # expects it, whatever the launcher. DDP ranks each do it, with equal seeds.
    module.to(trainer.strategy.root_device)
    if ckpt_path is None and init_model is None:
        facts.update(method.before_fit(module, datamodule.train_dataloader()))
    method.prepare_training(module, datamodule.train_dataloader())
    module.cpu()
    fit_seconds = time.perf_counter() - start
    if method.trains_shared_modules:  # stable_signature trains each copy instead
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    if read_with == "content_reader":  # the loss reader took the reader, and the base VAE attached to it (the
        model.content_reader.cpu()     # fidelity reference), to the training device; fit() brings back the module only
    module.extractor = model.extractor  # the hook whitens and calibrates the extractor, whichever the loss read
    module.to(trainer.strategy.root_device)  # the hook decodes images too: on the training device
    facts.update(method.after_fit(module, datamodule.train_dataloader()))
    module.cpu()  # evaluation and checkpoint writing below run on the CPU copy
    seconds = time.perf_counter() - start
    model.pnm.eval()
    model.extractor.eval()
    # ddp_spawn: this process's Trainer never ran the loop (its children did) and reports step 0;
    # the history rank 0 sent back inside the module's state counts the steps taken (each row is
    # written after its optimizer step, so its "step" is the number of steps completed).
    steps = int(trainer.global_step) or (module.history[-1]["step"] if module.history else 0)
    facts.update({"train_seconds": seconds, "detector_fit_seconds": fit_seconds, "steps": steps})
    return model, module, facts


def _loss_reader(model: FingerprintModel, read_with: str) -> torch.nn.Module:
    """What the training loss reads: the model's extractor, or its fitted content reader, fixed."""
    if read_with == "extractor":
        return model.extractor
    if read_with != "content_reader":
        raise ConfigError(f"a cycle's loss reads the extractor or the content_reader, not {read_with!r}")
    if model.content_reader is None:
        raise ConfigError("read_with=content_reader: the model has no content reader fitted yet")
    model.content_reader.eval().requires_grad_(False)
    return LossReader(model.content_reader)


def continued_model(init_model: FingerprintModel, method: FingerprintMethod, fingerprint_bits: int) -> FingerprintModel:
    """``init_model`` made trainable again, after checking that ``method`` would have built it: the
    same method, code length, PNM sites and reader (a loaded model's reader is frozen for use)."""
    fresh = method.record()
    wanted = {"method": fresh.get("method"), "fingerprint_bits": fingerprint_bits, "pnm": fresh.get("pnm"),
              "extractor": fresh.get("extractor")}
    found = {"method": init_model.method, "fingerprint_bits": init_model.fingerprint_bits,
             "pnm": init_model.meta.get("pnm"), "extractor": init_model.meta.get("extractor")}
    differs = [key for key in wanted if wanted[key] != found[key]]
    if differs:
        raise ConfigError(f"init_from: the checkpoint was not built by this method config ({', '.join(differs)} "
                          f"differ: {differs[0]}={found[differs[0]]!r} there, {wanted[differs[0]]!r} here)")
    if method.train.get("train_decoder") and init_model.reference_vae is None:
        init_model.reference_vae = deepcopy(init_model.vae).eval().requires_grad_(False)
    init_model.pnm.train()
    init_model.extractor.train().requires_grad_(True)
    return init_model


# -- evaluation ---------------------------------------------------------------------------------
def _decode_users(model: FingerprintModel, latents: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """``latents`` decoded by the users of ``bits``: the PNM decoder, one code per sample; for a
    method whose copies are trained one per user (stable_signature) the batch shares the first
    sample's code (``bits`` is overwritten with it) and is decoded by that user's trained copy."""
    if model.method not in COPY_TRAINERS:
        return model.pnm(latents, bits)
    bits[:] = bits[0]
    state = COPY_TRAINERS[model.method](model, bits[0].numpy())
    copy = deepcopy(model.pnm)
    copy.decoder.load_state_dict({k.removeprefix("decoder."): v for k, v in state.items() if k.startswith("decoder.")})
    return copy(latents, None)


@torch.no_grad()
def evaluate_fingerprint(
    model: FingerprintModel,
    loader: Iterable,
    max_images: int | None = None,
    probes: Iterable[str] = ROBUSTNESS_SUITE,
    seed: int = 12345,
) -> dict[str, Any]:
    """Held-out evaluation with fresh random fingerprints: bit accuracy, PSNR/SSIM against the
    base decoder, accuracy under each robustness probe (attack cases of
    :mod:`~fingerprint_lm.attacks.cases`, the collusion sweep's names and strengths), and the
    accuracy left once the carrier bias maps are removed (what the main-path affine sites carry on
    their own). PSNR/SSIM compare against ``model.reference_vae`` (the base decoder as it was)
    when the shared decoder was trained, else against the model's own base decoder."""
    generator = torch.Generator().manual_seed(seed)
    probes = {case: image_case(case) for case in probes}
    attack_generator = torch.Generator().manual_seed(seed + 1)  # the probes' random crops and noise
    total, correct, psnrs, ssims = 0, 0.0, [], []
    probe_correct = dict.fromkeys(probes, 0.0)
    no_carrier_correct = 0.0
    for batch in loader:
        if max_images is not None and total >= max_images:
            break
        images = batch["image"]
        latents = encode_latents(model.vae, images)
        bits = torch.randint(0, 2, (len(images), model.fingerprint_bits), generator=generator)
        if model.reference_vae is None:
            base = model.pnm(latents, None)
        else:  # a stock decode wants latents in the VAE's dtype (bf16 weights); PersonalizedDecoder casts
            base = decode_latents(model.reference_vae, latents)
        out = _decode_users(model, latents, bits)
        correct += ((model.reader(out) > 0).long() == bits).float().sum().item()
        psnrs.append(psnr(out, base))
        ssims.append(ssim(out, base) * len(images))
        for name, probe in probes.items():
            probe_correct[name] += ((model.reader(probe(out, attack_generator)) > 0).long()
                                    == bits).float().sum().item()
        if model.pnm.spatial_site_name is not None:
            no_carrier = model.pnm(latents, bits, carriers=False)
            no_carrier_correct += ((model.reader(no_carrier) > 0).long() == bits).float().sum().item()
        total += len(images)
    n_bits = total * model.fingerprint_bits
    metrics = {
        "bit_acc": correct / n_bits,
        "psnr": torch.cat(psnrs).mean().item(),
        "ssim": (torch.stack(ssims).sum() / total).item(),
        "eval_images": total,
        "robustness": {name: value / n_bits for name, value in probe_correct.items()},
    }
    if model.pnm.spatial_site_name is not None:
        metrics["bit_acc_carriers_removed"] = no_carrier_correct / n_bits
    return metrics
