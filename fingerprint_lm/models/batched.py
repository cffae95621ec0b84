"""One batched loop for encoding, decoding and reading images: a module runs on ``device`` in
batches (the heavy part at SD scale) and the results come back as float32 on the CPU, where
metrics, registries and copies' state dicts live."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from fingerprint_lm.models.vae import decode_latents, encode_latents


@contextmanager
def evaluating(*modules: torch.nn.Module) -> Iterator[None]:
    """``modules`` in eval mode inside the block; afterwards every submodule gets its own mode back.
    (``module.train(was_training)`` would set all submodules alike: a frozen part kept in eval
    mode inside a training module would come back training.)"""
    modes = [(sub, sub.training) for module in modules for sub in module.modules()]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for sub, mode in modes:
            sub.training = mode


@torch.no_grad()
def in_batches(
    module: torch.nn.Module,
    fn: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    device: str | torch.device = "cpu",
    batch_size: int = 64,
) -> torch.Tensor:
    """``torch.cat([fn(module, batch) for batch in inputs])`` with ``module`` and each batch on
    ``device``; float32 CPU output. ``module`` goes back to the device it came from afterwards (the
    CPU for the models and copies here, whose tensors are built from CPU state dicts; a module
    without parameters: the CPU)."""
    first = next(module.parameters(), None)
    home = first.device if first is not None else torch.device("cpu")
    try:
        module.to(device)
        return torch.cat(
            [fn(module, inputs[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(inputs), batch_size)]
        )
    finally:
        module.to(home)


def encode(vae, images: torch.Tensor, device: str | torch.device = "cpu", batch_size: int = 64) -> torch.Tensor:
    """The posterior modes (latents) of ``images`` under ``vae``'s encoder."""
    return in_batches(vae, encode_latents, images, device, batch_size)  # in the VAE's own dtype, float32 back


def decode(vae, latents: torch.Tensor, device: str | torch.device = "cpu", batch_size: int = 64) -> torch.Tensor:
    """Images decoded from ``latents`` by ``vae``'s decoder."""
    return in_batches(vae, decode_latents, latents, device, batch_size)


def extract(extractor, images: torch.Tensor, device: str | torch.device = "cpu", batch_size: int = 64) -> torch.Tensor:
    """The extractor's logits ``[n, k]`` for same-sized ``images``."""
    return in_batches(extractor, lambda m, x: m(x), images, device, batch_size)


# extract_repeated's memory: (reader's tensors, images) digest -> logits; a few entries, oldest out
_REPEATED: OrderedDict[str, torch.Tensor] = OrderedDict()
_REPEATED_SIZE = 8


def extract_repeated(extractor, images: torch.Tensor, device: str | torch.device = "cpu",
                     batch_size: int = 64) -> torch.Tensor:
    """:func:`extract` for images a process reads again and again with the same reader (the
    collusion sweep's base-decoder outputs, the same at every point of a model): the logits are
    remembered under a digest of every tensor of the reader (an attached VAE's included) and of the
    images, so a changed reader or image is read anew. Reading is deterministic, so a remembered
    read equals a fresh one."""
    digest = hashlib.sha256(str((tuple(images.shape), str(images.dtype))).encode())
    for name, tensor in extractor.state_dict().items():
        digest.update(name.encode() + tensor.detach().float().cpu().contiguous().numpy().tobytes())
    digest.update(images.detach().float().cpu().contiguous().numpy().tobytes())
    key = digest.hexdigest()
    if key not in _REPEATED:
        _REPEATED[key] = extract(extractor, images, device, batch_size)
        while len(_REPEATED) > _REPEATED_SIZE:
            _REPEATED.popitem(last=False)
    _REPEATED.move_to_end(key)
    return _REPEATED[key].clone()
