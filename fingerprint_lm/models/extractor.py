"""Fingerprint extractor: image -> k logits. Private to the distributor."""

from __future__ import annotations

import itertools

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from fingerprint_lm.errors import ConfigError
from fingerprint_lm.models.pooled_extractor import (
    BandEnergyExtractor,
    PooledExtractor,
    WhitenedReader,
    whitening_map,
)


def fold_tiles(images: torch.Tensor, tile_size: int) -> torch.Tensor:
    """Average an image over its ``tile_size`` periods: [B,C,H,W] -> [B,C,T,T] (any H, W >= T).

    A tile-periodic mark adds up coherently while content averages out, and the result has the
    same size at every resolution, so one detector serves 32 px and 512 px images.
    """
    b, c, h, w = images.shape
    h_c, w_c = (h // tile_size) * tile_size, (w // tile_size) * tile_size
    if h_c == 0 or w_c == 0:
        return F.interpolate(images, size=(tile_size, tile_size), mode="bilinear", align_corners=False)
    x = images[..., :h_c, :w_c].reshape(b, c, h_c // tile_size, tile_size, w_c // tile_size, tile_size)
    return x.mean(dim=(2, 4))


class FingerprintExtractor(nn.Module):
    """Two readers whose logits add up.

    * ``linear``: an affine map of the tile-folded image, initialised in closed form by a
      least-squares fit (``fit_linear_head``), which is what reads the carriers at step 0;
    * ``cnn``: a small convolutional network (last layer zero-initialised) that can learn
      content-dependent marks carried by the per-channel PNM sites.

    Parameters:
        fingerprint_bits: k.
        tile_size: the carrier tile size in output pixels.
        cnn_channels: widths of the CNN's stride-2 stages; empty disables the CNN.
        in_channels: image channels.
    """

    def __init__(
        self,
        fingerprint_bits: int,
        tile_size: int = 16,
        cnn_channels: tuple[int, ...] = (32, 64, 64),
        in_channels: int = 3,
    ):
        super().__init__()
        self.fingerprint_bits = fingerprint_bits
        self.tile_size = tile_size
        self.linear = nn.Linear(in_channels * tile_size * tile_size, fingerprint_bits)
        # Logit temperature of the linear reader: the LS fit outputs values near +-1.
        self.linear_gain = nn.Parameter(torch.tensor(4.0))
        layers: list[nn.Module] = []
        prev = in_channels
        for width in cnn_channels:
            layers += [nn.Conv2d(prev, width, 3, stride=2, padding=1), nn.GroupNorm(8, width), nn.SiLU()]
            prev = width
        self.cnn = nn.Sequential(*layers) if layers else None
        self.cnn_head = nn.Linear(prev, fingerprint_bits) if layers else None
        if self.cnn_head is not None:
            nn.init.zeros_(self.cnn_head.weight)
            nn.init.zeros_(self.cnn_head.bias)
        # What soft-decision attribution weighs the bits by (registry/soft.py): the logits whitened
        # on unmarked images (fit_soft_whitening). The bits stay the raw logits' signs, this
        # baseline's behaviour; only how much each bit counts in a soft score changes. Raw, this
        # reader's logits are correlated (largest correlation eigenvalue 16 of 48), so a code near a
        # shared direction scored high on many unmarked images at once: one registry of 100 accused
        # 394 of 10^4 at fpr 1e-3, bound 10 (experiments/results/soft_weight_whitening.md).
        # Identity until fitted, and for checkpoints written before it existed.
        self.register_buffer("soft_centre", torch.zeros(fingerprint_bits))
        self.register_buffer("soft_whitening", torch.eye(fingerprint_bits))

    @property
    def min_image_size(self) -> int:
        return self.tile_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        folded = fold_tiles(images, self.tile_size).flatten(1)
        logits = self.linear_gain * self.linear(folded)
        if self.cnn is not None:
            logits = logits + self.cnn_head(self.cnn(images).mean(dim=(2, 3)))
        return logits

    def soft_weights(self, logits: torch.Tensor) -> torch.Tensor:
        """The weights soft-decision attribution scores ``logits`` ``[n, k]`` with (float64)."""
        return (logits.double() - self.soft_centre.double()) @ self.soft_whitening.double().T

    @torch.no_grad()
    def fit_soft_whitening(self, unmarked_logits: torch.Tensor) -> None:
        """Fit :meth:`soft_weights` on this reader's logits ``[n, k]`` of unmarked images (n > k):
        the ZCA whitening with the whitened median at 0 (:func:`whitening_map`)."""
        centre, matrix = whitening_map(unmarked_logits)
        self.soft_centre.copy_(centre.to(self.soft_centre.dtype))
        self.soft_whitening.copy_(matrix.to(self.soft_whitening.dtype))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("soft_centre", "soft_whitening"):  # checkpoints written before 2026-12-05: identity
            state_dict.setdefault(prefix + name, getattr(self, name).detach().clone())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def fit_linear_head(self, images: torch.Tensor, bits: torch.Tensor, ridge: float = 1e-3) -> None:
        """Closed-form ridge regression from folded images to signs (+-1); whitening by the
        content covariance is what makes it read carriers a plain matched filter misses."""
        x = fold_tiles(images, self.tile_size).flatten(1).double()
        y = bits.double() * 2 - 1
        mean = x.mean(0, keepdim=True)
        xc = x - mean
        gram = xc.T @ xc / len(x)
        gram += ridge * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        weight = torch.linalg.solve(gram, xc.T @ y / len(x))  # [D, k]
        self.linear.weight.copy_(weight.T.to(self.linear.weight.dtype))
        self.linear.bias.copy_((-(mean @ weight)).squeeze(0).to(self.linear.bias.dtype))


EXTRACTOR_KINDS = ("tiled", "pooled", "band_energy")


def build_extractor(fingerprint_bits: int, tile_size: int = 16, kind: str = "tiled", **kwargs) -> nn.Module:
    """The extractor a checkpoint's ``extractor`` record describes. ``kind``:

    * ``tiled`` (the carrier method's; the default, so records written before ``kind`` existed
      still load): this module's tile-folding reader, ``kwargs`` are its arguments;
    * ``band_energy`` (fixed) or ``pooled`` (learned), both shift-invariant
      (:mod:`fingerprint_lm.models.pooled_extractor`): ``kwargs`` hold one settings dict per kind
      (``{"band_energy": {...}, "pooled": {...}}``) and the one named by ``kind`` is used, so a
      config switches reader with ``method.extractor.kind=pooled`` alone.
    """
    if kind == "tiled":
        return FingerprintExtractor(fingerprint_bits, tile_size=tile_size, **kwargs)
    if kind not in EXTRACTOR_KINDS:
        raise ConfigError(f"unknown extractor kind {kind!r} (choose one of: {', '.join(EXTRACTOR_KINDS)})")
    settings = dict(kwargs.get(kind) or {})
    try:
        if kind == "pooled":
            return PooledExtractor(fingerprint_bits, **settings)
        if "frequency" in settings:
            settings["frequency"] = tuple(settings["frequency"])
        return BandEnergyExtractor(fingerprint_bits, **settings)
    except TypeError as exc:  # an unknown setting: name it, in one line
        raise ConfigError(f"method.extractor.{kind}: {exc}") from exc


def soft_weights(extractor: nn.Module, logits) -> np.ndarray:
    """What soft-decision attribution weighs ``logits`` ``[n, k]`` by: the extractor's
    ``soft_weights`` (float64; the logits themselves for an extractor without one)."""
    method = getattr(extractor, "soft_weights", None)
    values = torch.as_tensor(np.asarray(logits, dtype=np.float64))
    if method is None:
        return values.numpy()
    with torch.no_grad():
        device = next(itertools.chain(extractor.buffers(), extractor.parameters()), values).device
        return method(values.to(device)).double().cpu().numpy()


def soft_null(extractor: nn.Module) -> tuple[np.ndarray, np.ndarray] | None:
    """The centre ``[k]`` and a covariance root ``[k, k]`` of the extractor's logits on unmarked
    images, for ``soft_code_null`` decoding (``registry/soft.py: CodeNull``). The carrier reader:
    the inverse of its fitted ZCA soft whitening (symmetric, so ``root root' = C``). A whitened
    reader (pnm's; :class:`~fingerprint_lm.models.pooled_extractor.WhitenedReader`) with its full
    whitening fitted: its logits are ``gain x bit_scale x`` white with median 0 on the unmarked
    images it was fitted on, so ``(0, gain diag(bit_scale))``. None when neither is known: a
    reader never fitted, or one only standardised per logit (``decorrelate=false``: its logits
    stay correlated)."""
    if isinstance(extractor, WhitenedReader):
        k = int(extractor.fingerprint_bits)
        fitted = not _never_fitted(extractor.whiten_matrix, extractor.whiten_mean)
        root = float(extractor.gain) * np.diag(extractor.bit_scale.double().cpu().numpy())
        return (np.zeros(k), root) if fitted and extractor.decorrelate else None
    if not hasattr(extractor, "soft_whitening") or _never_fitted(extractor.soft_whitening, extractor.soft_centre):
        return None  # no soft whitening, or never fitted (checkpoints written before 2026-12-05)
    with torch.no_grad():
        whitening = extractor.soft_whitening.double().cpu()
        return extractor.soft_centre.double().cpu().numpy(), torch.linalg.inv(whitening).numpy()


def _never_fitted(matrix: torch.Tensor, centre: torch.Tensor) -> bool:
    """A whitening still at its initial value: the identity, centred at 0."""
    return torch.equal(matrix.cpu(), torch.eye(len(matrix), dtype=matrix.dtype)) and not centre.any()
