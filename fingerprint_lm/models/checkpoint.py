"""The trained fingerprinting model on disk: safetensors only, never pickles.

Layout of a checkpoint directory::

    base_vae/                     diffusers AutoencoderKL folder (config.json + safetensors)
    fingerprint.safetensors       PNM (mapping, heads, carriers) and extractor tensors; the content
                                  reader's, where one was fitted (models/content_reader.py)
    fingerprint.json              how to rebuild the modules (bits, sites, tile, widths) + provenance
    reference_vae/                (methods that train the shared decoder) the decoder as it was
    SHA256SUMS                    every file's SHA-256 (``sha256sum -c`` format), checked on load:
                                  a truncated or altered checkpoint is refused, not half-loaded

It is private to the distributor: user copies (``registry``) contain neither the mapping network
nor the extractor.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fingerprint_lm.errors import CheckpointError
from fingerprint_lm.models.content_reader import content_reader_from, statistics_of_width
from fingerprint_lm.models.extractor import build_extractor
from fingerprint_lm.models.pnm import PersonalizedDecoder
from fingerprint_lm.models.vae import load_vae
from fingerprint_lm.storage import atomic_directory, mismatched_files, write_checksums

ASSETS = Path(__file__).resolve().parents[1] / "assets"
# The shipped checkpoint of each method: assets/<method.checkpoint_name> (conf/method/*.yaml).
SHIPPED_CHECKPOINT = ASSETS / "embedded"  # method=carrier, the default


def recorded_method(meta: dict[str, Any]) -> str:
    """The method a checkpoint record (``fingerprint.json``) or a sweep point names; ones written
    before methods existed are the carrier design."""
    return str(meta.get("method") or "carrier")


def shipped_checkpoint(checkpoint_name: str = "embedded") -> Path:
    """The shipped checkpoint folder of a method (``method.checkpoint_name``)."""
    return ASSETS / checkpoint_name


def checkpoint_code_length(directory: str | Path) -> int:
    """The fingerprint length of a checkpoint, from its ``fingerprint.json`` alone (no weights read)."""
    meta_path = Path(directory) / "fingerprint.json"
    if not meta_path.is_file():
        raise CheckpointError(f"no fingerprint checkpoint at {directory} (fingerprint.json missing)")
    try:
        return int(json.loads(meta_path.read_text())["fingerprint_bits"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"corrupt {meta_path}: {exc}") from exc


@dataclass
class FingerprintModel:
    """Everything the distributor keeps: base VAE, PNM decoder and extractor, plus metadata.

    ``reference_vae``: when training moved the shared decoder (``train_decoder``), the base VAE as
    it was, which fidelity (PSNR, SSIM, the sweep's unmarked outputs) is measured against; None
    when ``vae`` is still the base."""

    vae: Any
    pnm: PersonalizedDecoder
    extractor: Any  # models.extractor.build_extractor: tiled, pooled or band_energy
    meta: dict[str, Any]
    reference_vae: Any = None
    # the distributor's fit of a code's probe read (distributor/read_predictor.py), {} when none
    issue_predictor: dict[str, torch.Tensor] = field(default_factory=dict)
    # pnm's content-dividing reader (models/content_reader.py), fitted after training; None when none
    content_reader: Any = None

    @property
    def reader(self) -> Any:
        """What the distributor reads found images with: the content reader where one was fitted,
        else the extractor (which training reads with, and keeps reading with)."""
        return self.extractor if self.content_reader is None else self.content_reader

    @property
    def unmarked_vae(self) -> Any:
        """The VAE whose outputs count as unmarked: the base as it was (``reference_vae``) when
        training moved the shared decoder, else ``vae``."""
        return self.vae if self.reference_vae is None else self.reference_vae

    @property
    def method(self) -> str:
        """The method that trained it (:func:`recorded_method`)."""
        return recorded_method(self.meta)

    @property
    def fingerprint_bits(self) -> int:
        return self.pnm.fingerprint_bits

    def to(self, device: str | torch.device) -> FingerprintModel:
        """Every module of the model on ``device`` (a content reader's attached base VAE with it)."""
        for module in (self.vae, self.pnm, self.extractor, self.reference_vae, self.content_reader):
            if module is not None:
                module.to(device)
        return self


def build_fingerprint_model(vae, fingerprint_bits: int, pnm_kwargs: dict, extractor_kwargs: dict, meta=None):
    post_quant_conv = vae.post_quant_conv if getattr(vae.config, "use_post_quant_conv", True) else None
    pnm = PersonalizedDecoder(vae.decoder, fingerprint_bits, post_quant_conv=post_quant_conv, **pnm_kwargs)
    extractor = build_extractor(fingerprint_bits, tile_size=pnm_kwargs.get("tile_size", 16), **extractor_kwargs)
    return FingerprintModel(vae, pnm, extractor, dict(meta or {}))


def private_state_dict(model: FingerprintModel) -> dict[str, torch.Tensor]:
    """PNM parameters (decoder weights excluded: they live in ``base_vae/``), the extractor and
    the distributor's read predictor, when fitted."""
    state = {
        f"pnm.{k}": v
        for k, v in model.pnm.state_dict().items()
        if not k.startswith(("decoder.", "post_quant_conv."))
    }
    state.update({f"extractor.{k}": v for k, v in model.extractor.state_dict().items()})
    state.update({f"issue_predictor.{k}": v for k, v in model.issue_predictor.items()})
    if model.content_reader is not None:  # without its base VAE, which the checkpoint keeps already
        state.update({f"content_reader.{k}": v for k, v in model.content_reader.own_state().items()})
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


def save_fingerprint_model(model: FingerprintModel, directory: str | Path) -> Path:
    """Write atomically: the directory appears complete or not at all."""
    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        _save_vae(model.vae, tmp / "base_vae")
        if model.reference_vae is not None:
            _save_vae(model.reference_vae, tmp / "reference_vae")
        save_file(private_state_dict(model), tmp / "fingerprint.safetensors")
        (tmp / "fingerprint.json").write_text(json.dumps(model.meta, indent=2, sort_keys=True) + "\n")
        write_checksums(tmp)
    return directory


def rewrite_private_state(model: FingerprintModel, directory: str | Path) -> None:
    """Rewrite a saved checkpoint's ``fingerprint.safetensors`` and ``fingerprint.json`` from
    ``model`` (and its ``SHA256SUMS``), atomically; the VAE folders keep their bytes. For a fit made
    after training (experiments/fit_soft_whitening.py, experiments/fit_bit_slopes.py)."""
    directory = Path(directory)
    with atomic_directory(directory) as tmp:  # the folder is replaced whole, or not at all
        shutil.copytree(directory, tmp, dirs_exist_ok=True)
        save_file(private_state_dict(model), tmp / "fingerprint.safetensors")
        (tmp / "fingerprint.json").write_text(json.dumps(model.meta, indent=2, sort_keys=True) + "\n")
        write_checksums(tmp)


def _save_vae(vae, folder: Path) -> None:
    vae.save_pretrained(folder, safe_serialization=True)
    # diffusers records where the VAE was loaded from (a cache path of this machine): not for a checkpoint
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    if config.pop("_name_or_path", None) is not None:
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def load_fingerprint_model(directory: str | Path | None = None, map_location: str = "cpu") -> FingerprintModel:
    """Load a checkpoint directory (default: the embedded checkpoint shipped in the package)."""
    directory = Path(directory) if directory is not None else SHIPPED_CHECKPOINT
    meta_path = directory / "fingerprint.json"
    if not meta_path.is_file():
        raise CheckpointError(f"no fingerprint checkpoint at {directory} (fingerprint.json missing)")
    # Checkpoints written before SHA256SUMS existed (None) load unchecked.
    if bad := mismatched_files(directory):
        raise CheckpointError(f"checkpoint {directory}: {', '.join(bad[:3])} truncated, altered or missing "
                              "(does not match its SHA256SUMS)")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"corrupt {meta_path}: {exc}") from exc
    vae = load_vae(directory / "base_vae")
    try:
        model = build_fingerprint_model(vae, int(meta["fingerprint_bits"]), meta["pnm"], meta["extractor"], meta)
    except (KeyError, TypeError, ValueError) as exc:  # a record that no longer describes the modules
        raise CheckpointError(f"{meta_path} does not describe a fingerprint model: {exc!r}") from exc
    try:
        state = load_file(directory / "fingerprint.safetensors", device=map_location)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {directory / 'fingerprint.safetensors'}: {exc}") from exc
    pnm_state = {k[4:]: v for k, v in state.items() if k.startswith("pnm.")}
    extractor_state = {k[10:]: v for k, v in state.items() if k.startswith("extractor.")}
    model.issue_predictor = {k[len("issue_predictor."):]: v for k, v in state.items()
                             if k.startswith("issue_predictor.")}
    try:
        missing, unexpected = model.pnm.load_state_dict(pnm_state, strict=False)
        missing = [k for k in missing if not k.startswith(("decoder.", "post_quant_conv."))]
        if missing or unexpected:
            raise CheckpointError(f"checkpoint {directory} does not match its config: missing {missing[:3]}")
        model.extractor.load_state_dict(extractor_state)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {directory} does not match its config: {str(exc).splitlines()[0]}") from exc
    if (directory / "reference_vae").is_dir():
        model.reference_vae = load_vae(directory / "reference_vae").eval()
    content_state = {k[len("content_reader."):]: v for k, v in state.items() if k.startswith("content_reader.")}
    if content_state:
        try:
            # what it reads follows from how many reads it whitens (energy: 2k; covariance: 14k)
            width = content_state.get("feature_centre", torch.empty(2 * model.fingerprint_bits)).numel()
            statistics = statistics_of_width(width, model.fingerprint_bits)
            model.content_reader = content_reader_from(model.extractor, model.unmarked_vae, statistics)
            model.content_reader.load_own_state(content_state)
        except RuntimeError as exc:
            raise CheckpointError(f"checkpoint {directory}: {str(exc).splitlines()[0]}") from exc
        model.content_reader.eval()
    model.vae.eval()
    # A loaded model is used, not trained: a reader with learned filters must not collect
    # gradients when a copy is fine-tuned against it (stable_signature).
    model.extractor.eval().requires_grad_(False)
    return model
