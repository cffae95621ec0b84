"""``method=stable_signature`` (baseline, issue 14): one decoder fine-tuned per user.

Stable Signature (Fernandez et al., 2023) fixes a pretrained extractor and, for each user, fine-tunes
a copy of the whole decoder so that the extractor reads that user's message from everything it
decodes: about 100 AdamW steps of a message BCE on the extractor's logits plus an image loss
against the base decoder. Here the extractor is the same fixed band-energy reader ``method=pnm``
ships (whitened on unmarked images: the "training" stage of this method is that whitening alone,
``steps: 0``), so the two differ in how a code reaches the weights: a shared mapping network (one
training run, a copy costs a forward pass) against a training run per copy. The copy is the stock
``AutoencoderKL`` with its own decoder weights.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch.nn import functional as F

from fingerprint_lm.data.synthetic import ProceduralImages
from fingerprint_lm.errors import ConfigError, check_float, check_int, settings_from
from fingerprint_lm.methods.base import COPY_TRAINERS
from fingerprint_lm.methods.pnm import PNMMethod
from fingerprint_lm.models.vae import encode_latents

# Images the distributor fine-tunes copies on: a stream seed no training, test or sweep set uses.
COPY_IMAGE_SEED = 7_000_003


@dataclass
class StableSignatureMethod(PNMMethod):
    """No shared PNM (no sites); ``copy_finetune`` holds the per-copy recipe (:func:`finetune_copy`)."""

    steps: int = 0  # unused: nothing shared is trained (debug overlays may set it all the same)
    copy_finetune: dict[str, Any] = field(default_factory=dict)
    trains_shared_modules: ClassVar[bool] = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pnm.get("affine_sites") or self.pnm.get("conv_sites") or self.pnm.get("kernel_sites"):
            raise ConfigError("method=stable_signature has no shared PNM: method.pnm sites must be empty")
        settings_from(CopyFinetune, self.copy_finetune, "method.copy_finetune")  # now, not at the first copy

    def record(self) -> dict[str, Any]:
        return {**super().record(), "copy_finetune": dict(self.copy_finetune)}

    def after_fit(self, module, loader: Iterable) -> dict[str, Any]:
        return {}  # nothing was trained: the whitening before_fit did stands


@dataclass(frozen=True)
class CopyFinetune:
    """Stable Signature's per-copy recipe at the embedded scale."""

    steps: int = 100
    lr: float = 1e-3  # = conf/method/stable_signature.yaml (1e-4 read 0.69 after 100 steps, 1e-3 0.75)
    batch_size: int = 16
    image_weight: float = 100.0  # weight of the MSE against the base decoder (the paper: Watson-VGG)
    pool: int = 256  # distributor images the copy is tuned on (procedural, a seed of their own)
    logit_scale: float = 1.0  # the BCE reads scaled logits (their ``10 * logits`` of a HiDDeN head)

    def __post_init__(self) -> None:
        check_int("steps", self.steps)
        check_int("batch_size", self.batch_size)
        check_int("pool", self.pool)
        check_float("lr", self.lr, above=0.0)
        check_float("logit_scale", self.logit_scale, above=0.0)
        check_float("image_weight", self.image_weight, minimum=0.0)


_MEMO: dict[tuple, dict[str, torch.Tensor]] = {}  # (model digest, code, recipe) -> decoder state
_MEMO_SIZE = 16


def _digest(model) -> str:
    """A fingerprint of the base VAE and the extractor, computed on every call (milliseconds here)
    so that neither a changed model nor its saved record can carry a stale one."""
    digest = hashlib.sha256()
    for module in (model.vae, model.extractor):
        for name, tensor in sorted(module.state_dict().items()):
            digest.update(name.encode() + tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def finetune_copy(model, bits) -> dict[str, torch.Tensor]:
    """The VAE state dict of a copy whose decoder was fine-tuned for ``bits`` (deterministic: the
    code seeds the run). The last few results are memoised: a collusion sweep asks for the same
    colluder codes under every ACT type and attack, and the ACT is applied after this."""
    recipe = settings_from(CopyFinetune, model.meta.get("copy_finetune", {}), "copy_finetune")
    code = np.asarray(bits, dtype=np.uint8).reshape(-1)
    if len(code) != model.fingerprint_bits:
        raise ConfigError(f"fingerprint has {len(code)} bits but this model was built for {model.fingerprint_bits}")
    key = (_digest(model), code.tobytes(), recipe)
    if key not in _MEMO:
        if len(_MEMO) >= _MEMO_SIZE:
            _MEMO.pop(next(iter(_MEMO)))
        _MEMO[key] = _finetune(model, code, recipe)
    return {name: tensor.clone() for name, tensor in _MEMO[key].items()}


def _finetune(model, code: np.ndarray, recipe: CopyFinetune) -> dict[str, torch.Tensor]:
    seed = int.from_bytes(hashlib.sha256(code.tobytes()).digest()[:8], "little") % 2**63
    generator = torch.Generator().manual_seed(seed)
    resolution = int(model.meta.get("resolution", 32))
    stream = ProceduralImages(resolution, COPY_IMAGE_SEED, recipe.pool)
    images = torch.stack([stream.sample(i)["image"] for i in range(recipe.pool)])
    vae, pnm = model.vae, model.pnm
    with torch.no_grad():
        latents = encode_latents(vae, images).contiguous()  # a strided view crashes backward on CPU
        if pnm.post_quant_conv is not None:
            latents = pnm.post_quant_conv(latents)
        base = pnm.decoder(latents)
    decoder = copy.deepcopy(pnm.decoder).train()
    decoder.requires_grad_(True)
    extractor = model.extractor.eval()
    target = torch.as_tensor(code, dtype=torch.float32)
    optimizer = torch.optim.AdamW(decoder.parameters(), lr=recipe.lr)
    with torch.enable_grad():
        for _ in range(recipe.steps):
            batch = torch.randint(0, recipe.pool, (recipe.batch_size,), generator=generator)
            out = decoder(latents[batch])
            logits = extractor(out) * recipe.logit_scale
            loss = F.binary_cross_entropy_with_logits(logits, target.expand_as(logits))
            loss = loss + recipe.image_weight * F.mse_loss(out, base[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    state = {name: tensor.detach().clone() for name, tensor in vae.state_dict().items()}
    state.update({f"decoder.{name}": tensor.detach().clone() for name, tensor in decoder.state_dict().items()})
    return state


COPY_TRAINERS["stable_signature"] = finetune_copy
