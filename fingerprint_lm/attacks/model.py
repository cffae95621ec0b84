"""Model-level attacks: what a user holding a copy's weights (or only its outputs) may do.

State-dict attacks are pure: they take a plain ``dict[str, Tensor]`` and return a new one with
fresh tensors, leaving the input untouched. Only floating-point tensors are attacked; integer
buffers are copied. Randomness comes from an explicit ``torch.Generator``.

- :func:`weight_noise`: Gaussian noise relative to each tensor's standard deviation.
- :func:`magnitude_prune`: zero the smallest weights of every conv/linear weight (per tensor).
- :func:`quantize_roundtrip`: int8 (per-tensor symmetric), fp16 or bf16 and back.
- :func:`finetune_reconstruction`: fine-tune the copy's decoder on reconstruction alone.
- :func:`swap_in_base`: replace the copy by a base model the attacker somehow holds.
- :func:`estimate_and_remove`: removal by estimation, from one's own outputs only.
- :func:`spectral_equalize`: removal of a mark that tilts the outputs' spectrum (pnm, wouaf), from
  one's own outputs and unmarked images of the same kind.
- :func:`zero_mark_parameters`: zero parameters that carry the mark alone (e.g. a bias map).

:data:`STATE_ATTACKS` names the first three with the common signature ``fn(state_dict, strength,
generator=None)`` (``weight_noise``, ``prune``, ``quantize_<int8|fp16|bf16>``).
"""

from __future__ import annotations

import copy
import fnmatch
import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from fingerprint_lm.attacks.image import gaussian_blur
from fingerprint_lm.errors import ConfigError, DataError, check_int

StateDict = dict[str, torch.Tensor]

QUANTIZE_MODES: tuple[str, ...] = ("int8", "fp16", "bf16")


def _clone(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    return {key: value.detach().clone() for key, value in state_dict.items()}


def weight_noise(
    state_dict: Mapping[str, torch.Tensor],
    relative_std: float,
    generator: torch.Generator | None = None,
) -> StateDict:
    """Add ``N(0, (relative_std * std(W))^2)`` to every floating-point tensor ``W``.

    ``std(W)`` is the tensor's own (population) standard deviation; a tensor of one element, or a
    constant one (a fresh GroupNorm weight), uses its root mean square instead so it is still
    perturbed. Noise is drawn on the CPU in float64 from ``generator``, in key order.
    """
    if relative_std < 0:
        raise ConfigError(f"relative noise std must be non-negative, got {relative_std}")
    out = _clone(state_dict)
    for key, value in out.items():
        if not value.is_floating_point() or value.numel() == 0:
            continue
        data = value.double()
        scale = data.std(unbiased=False).item() if data.numel() > 1 else 0.0
        if scale == 0.0:
            scale = data.pow(2).mean().sqrt().item()
        noise = torch.randn(value.shape, generator=generator, dtype=torch.float64)
        out[key] = (data + relative_std * scale * noise.to(value.device)).to(value.dtype)
    return out


def magnitude_prune(state_dict: Mapping[str, torch.Tensor], fraction: float) -> StateDict:
    """Zero the ``fraction`` of entries with the smallest magnitude, separately in every weight
    tensor of two or more dimensions (conv kernels, linear layers).

    Per tensor rather than global: a global threshold would empty the small-magnitude layers
    entirely and measure layer scales rather than robustness. Biases and normalisation affines
    (1-d) are left alone, as ``torch.nn.utils.prune`` users do. Exactly ``floor(fraction * n)``
    entries are zeroed per tensor (among equal magnitudes, which ones is unspecified).
    """
    if not 0 <= fraction <= 1:
        raise ConfigError(f"pruning fraction must be in [0, 1], got {fraction}")
    out = _clone(state_dict)
    for key, value in out.items():
        if not value.is_floating_point() or value.dim() < 2:
            continue
        count = math.floor(fraction * value.numel())
        if count == 0:
            continue
        flat = value.reshape(-1).clone()
        smallest = torch.topk(flat.abs().double(), count, largest=False, sorted=False).indices
        flat[smallest] = 0
        out[key] = flat.view(value.shape)
    return out


def quantize_roundtrip(state_dict: Mapping[str, torch.Tensor], mode: str) -> StateDict:
    """Quantise every floating-point tensor and convert it back to its own dtype.

    ``int8``: per-tensor symmetric, ``scale = max|W| / 127``, ``round(W / scale)`` in
    [-127, 127]; the error of each entry is at most ``scale / 2``. ``fp16`` / ``bf16``: a cast
    and back (fp16 saturates at +-65504).
    """
    if mode not in QUANTIZE_MODES:
        raise ConfigError(f"unknown quantization mode {mode!r}; expected one of {', '.join(QUANTIZE_MODES)}")
    out = _clone(state_dict)
    for key, value in out.items():
        if not value.is_floating_point():
            continue
        if mode == "fp16":
            out[key] = value.to(torch.float16).to(value.dtype)
        elif mode == "bf16":
            out[key] = value.to(torch.bfloat16).to(value.dtype)
        else:
            data = value.double()
            peak = data.abs().max().item() if data.numel() else 0.0
            if peak == 0.0:
                continue
            scale = peak / 127
            out[key] = ((data / scale).round().clamp(-127, 127) * scale).to(value.dtype)
    return out


def prune(state_dict: Mapping[str, torch.Tensor], strength: float,
          generator: torch.Generator | None = None) -> StateDict:
    """:func:`magnitude_prune` with the common signature (case ``prune_<fraction>``)."""
    return magnitude_prune(state_dict, float(strength))


def quantize_int8(state_dict: Mapping[str, torch.Tensor], strength: float | None = None,
                  generator: torch.Generator | None = None) -> StateDict:
    """:func:`quantize_roundtrip` to int8 with the common signature (``strength`` is ignored)."""
    return quantize_roundtrip(state_dict, "int8")


def quantize_fp16(state_dict: Mapping[str, torch.Tensor], strength: float | None = None,
                  generator: torch.Generator | None = None) -> StateDict:
    """:func:`quantize_roundtrip` to fp16 with the common signature (``strength`` is ignored)."""
    return quantize_roundtrip(state_dict, "fp16")


def quantize_bf16(state_dict: Mapping[str, torch.Tensor], strength: float | None = None,
                  generator: torch.Generator | None = None) -> StateDict:
    """:func:`quantize_roundtrip` to bf16 with the common signature (``strength`` is ignored)."""
    return quantize_roundtrip(state_dict, "bf16")


# The state-dict attacks on one copy by name, each ``fn(state_dict, strength, generator=None) ->
# state_dict`` (strength None when a case gives none). Plug-ins join them by name
# (attacks.cases.register_model_attack; the conf/attacks/ group's ``model:``). ``finetune`` is a
# model attack too, but it trains a decoder on the attacker's images: the evaluation runs it.
STATE_ATTACKS: dict[str, Callable[..., StateDict]] = {
    "weight_noise": weight_noise,
    "prune": prune,
    "quantize_int8": quantize_int8,
    "quantize_fp16": quantize_fp16,
    "quantize_bf16": quantize_bf16,
}


def _image_batches(
    images_or_loader: torch.Tensor | Iterable, batch_size: int, generator: torch.Generator | None
) -> Iterable[torch.Tensor]:
    """Endless batches: shuffled passes over a tensor, or a loader's batches repeated."""
    if isinstance(images_or_loader, torch.Tensor):
        images = images_or_loader
        if images.dim() != 4 or images.shape[0] == 0:
            raise DataError(
                f"fine-tuning images must be a non-empty [N, C, H, W] tensor, got {tuple(images.shape)}"
            )
        while True:
            order = torch.randperm(images.shape[0], generator=generator)
            for start in range(0, len(order), batch_size):
                yield images[order[start : start + batch_size]]
    else:
        while True:
            seen = False
            for item in images_or_loader:
                seen = True
                yield item["image"] if isinstance(item, Mapping) else item
            if not seen:
                raise DataError("the fine-tuning loader yielded no batches")


def finetune_reconstruction(
    vae: nn.Module,
    steps: int,
    lr: float,
    images_or_loader: torch.Tensor | Iterable,
    batch_size: int = 16,
    generator: torch.Generator | None = None,
) -> nn.Module:
    """The attacker fine-tunes the copy's decoder on reconstruction only, with no extractor.

    Loss: ``MSE(decode(mode(encode(x))), x)``; Adam on the decoder path (``post_quant_conv`` and
    ``decoder``), encoder frozen. Works on a deep copy: ``vae`` is untouched, the fine-tuned copy
    is returned in eval mode.

    Parameters:
        vae: a diffusers ``AutoencoderKL`` (the user's copy, loaded).
        steps: optimiser steps.
        lr: Adam learning rate.
        images_or_loader: a ``[N, 3, H, W]`` tensor in ``[-1, 1]`` (shuffled with ``generator``,
            batches of ``batch_size``) or an iterable of batches (tensors or dicts with ``"image"``),
            restarted when exhausted.
    """
    check_int("fine-tuning steps", steps, 0)
    if lr <= 0:
        raise ConfigError(f"fine-tuning learning rate must be positive, got {lr}")
    attacked = copy.deepcopy(vae)
    decoder_params = [
        p for name, p in attacked.named_parameters() if name.startswith(("decoder.", "post_quant_conv."))
    ]
    if not decoder_params:
        raise ConfigError("the model has no decoder parameters (decoder.* / post_quant_conv.*) to fine-tune")
    for p in attacked.parameters():
        p.requires_grad_(False)
    for p in decoder_params:
        p.requires_grad_(True)
    optimizer = torch.optim.Adam(decoder_params, lr=lr)
    parameter = decoder_params[0]
    attacked.train()
    batches = iter(_image_batches(images_or_loader, batch_size, generator))
    for _ in range(steps):
        x = next(batches).to(parameter.device, parameter.dtype)
        with torch.no_grad():
            latents = attacked.encode(x).latent_dist.mode()
        loss = F.mse_loss(attacked.decode(latents).sample, x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    attacked.eval()
    for p in attacked.parameters():
        p.requires_grad_(False)
    return attacked


def swap_in_base(
    copy_state_dict: Mapping[str, torch.Tensor], base_state_dict: Mapping[str, torch.Tensor]
) -> StateDict:
    """The attacker replaces their copy by the base model (a leaked or public checkpoint).

    Returns a fresh copy of ``base_state_dict``; the keys must be those of the copy (the swapped
    model has to load where the copy did), otherwise ConfigError.
    """
    missing = copy_state_dict.keys() - base_state_dict.keys()
    extra = base_state_dict.keys() - copy_state_dict.keys()
    if missing or extra:
        raise ConfigError(
            f"base model does not match the copy: missing {sorted(missing)[:5]}, extra {sorted(extra)[:5]}"
        )
    return _clone(base_state_dict)


def _periodic_mean(residual: torch.Tensor, period: tuple[int, int]) -> torch.Tensor:
    """Average ``[C, H, W]`` over all positions congruent modulo ``period`` (partial tiles
    included) and tile the ``[C, p_h, p_w]`` mean back to ``[C, H, W]``."""
    channels, height, width = residual.shape
    p_h, p_w = period
    rows = torch.arange(height) % p_h
    cols = torch.arange(width) % p_w
    cell = (rows[:, None] * p_w + cols[None, :]).reshape(-1)
    sums = torch.zeros(channels, p_h * p_w, dtype=residual.dtype)
    sums.index_add_(1, cell, residual.reshape(channels, -1))
    counts = torch.bincount(cell, minlength=p_h * p_w).to(residual.dtype)
    return (sums / counts)[:, cell].reshape(channels, height, width)


@torch.no_grad()
def estimate_and_remove(
    images: torch.Tensor,
    period: int | Sequence[int] | None = None,
    blur_sigma: float = 1.0,
) -> torch.Tensor:
    """Removal by estimation: subtract the mark shared by a user's own outputs.

    The attacker needs neither the extractor nor the base model, only ``N`` of their images. The
    high-pass residual ``x - blur(x)`` of every image is content plus mark; averaged over images,
    content cancels and a fixed additive mark remains. With ``period`` (pixels, or ``(rows,
    cols)``), that mean residual is further averaged over tile positions, which keeps only its
    tile-periodic part: the fit for a mark made of a repeated tile, and far less content leaks in.

    Parameters:
        images: ``[N, 3, H, W]`` in ``[-1, 1]``, all from one copy.
        period: the tile period of the mark, if known or guessed (e.g. from the residual's spectrum).
        blur_sigma: the Gaussian blur (pixels) defining the high-pass residual.

    Returns the cleaned images ``clamp(x - estimate, -1, 1)``.
    """
    if images.dim() != 4 or images.shape[0] == 0:
        raise DataError(
            f"estimate_and_remove needs a non-empty [N, C, H, W] batch, got {tuple(images.shape)}"
        )
    x = images.detach().double().cpu()
    estimate = (x - gaussian_blur(x, blur_sigma)).mean(dim=0)
    if period is not None:
        p_h, p_w = (int(period), int(period)) if isinstance(period, int) else (int(period[0]), int(period[1]))
        if p_h < 1 or p_w < 1:
            raise ConfigError(f"period must be positive, got {period}")
        estimate = _periodic_mean(estimate, (p_h, p_w))
    cleaned = (x - estimate[None]).clamp(-1, 1)
    return cleaned.to(images.device, images.dtype)


@torch.no_grad()
def spectral_equalize(images: torch.Tensor, reference: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """Removal by estimation for a mark that lives in the outputs' spectrum, not in their pixels.

    A per-channel change of a decoder's normalisation (pnm, wouaf) shifts how much energy a copy's
    outputs put in each frequency band, the same for every image, and a band-energy reader reads
    that shift. The attacker averages the amplitude spectrum of their own outputs and of unmarked
    images of the same kind (``reference``: photographs they hold, not the base model's outputs),
    and filters every output by the ratio, per colour channel and frequency, so that their outputs'
    mean spectrum becomes the reference's. Content averages out of both means; a user's
    fixed tilt does not. The filter also moves the outputs towards the reference's spectrum where
    the decoder itself differs from it, which costs PSNR: the price the attacker pays.

    Parameters:
        images: ``[N, C, H, W]`` in ``[-1, 1]``, all from one copy.
        reference: ``[M, C, H, W]`` unmarked images of the same size.
        strength: the filter is ``ratio ** strength`` (0: no change, 1: the full ratio).

    Returns the filtered images, clamped to ``[-1, 1]``.
    """
    if images.dim() != 4 or images.shape[0] == 0 or reference.dim() != 4 or reference.shape[0] == 0:
        raise DataError(f"spectral_equalize needs non-empty [N, C, H, W] batches, got "
                        f"{tuple(images.shape)} and {tuple(reference.shape)}")
    if images.shape[1:] != reference.shape[1:]:
        raise DataError(f"spectral_equalize: images {tuple(images.shape[1:])} and reference "
                        f"{tuple(reference.shape[1:])} differ in size")
    if not math.isfinite(strength) or strength < 0:
        raise ConfigError(f"strength must be >= 0, got {strength}")
    spectra = torch.fft.fft2(images.detach().double().cpu())
    own = spectra.abs().mean(dim=0)
    target = torch.fft.fft2(reference.detach().double().cpu()).abs().mean(dim=0)
    ratio = (target / own.clamp_min(1e-12 * float(own.max()))) ** strength
    cleaned = torch.fft.ifft2(spectra * ratio[None]).real.clamp(-1, 1)
    return cleaned.to(images.device, images.dtype)


def zero_mark_parameters(state_dict: Mapping[str, torch.Tensor], names: Iterable[str]) -> StateDict:
    """Zero the tensors that carry the mark alone (e.g. a copy's spatial bias map).

    ``names`` are exact keys or ``fnmatch`` patterns (``"*.bias_map"``); other keys, including ones
    no VAE has, are copied unchanged. A name that matches nothing is a ConfigError: an attack that
    silently does nothing would report robustness that was never tested.
    """
    names = list(names)
    out = _clone(state_dict)
    for name in names:
        matched = [key for key in out if key == name or fnmatch.fnmatchcase(key, name)]
        if not matched:
            raise ConfigError(f"no parameter matches {name!r}")
        for key in matched:
            out[key] = torch.zeros_like(out[key])
    return out
