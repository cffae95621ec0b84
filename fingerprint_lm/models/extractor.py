"""Fingerprint extractor: image -> k logits. Private to the distributor."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from fingerprint_lm.errors import ConfigError
from fingerprint_lm.models.pooled_extractor import BandEnergyExtractor, PooledExtractor


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

    @property
    def min_image_size(self) -> int:
        return self.tile_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        folded = fold_tiles(images, self.tile_size).flatten(1)
        logits = self.linear_gain * self.linear(folded)
        if self.cnn is not None:
            logits = logits + self.cnn_head(self.cnn(images).mean(dim=(2, 3)))
        return logits

    @torch.no_grad()
    def fit_linear_head(self, images: torch.Tensor, bits: torch.Tensor, ridge: float = 1e-3) -> None:
        """Closed-form ridge regression from folded images to signs (+-1); whitening by the
        content covariance is what makes it read carriers a plain matched filter misses."""
        x = fold_tiles(images, self.tile_size).flatten(1).double()
        y = bits.double() * 2 - 1
        mean = x.mean(0, keepdim=True)
        xc = x - mean
        gram = xc.T @ xc / len(x)
        gram += ridge * gram.diagonal().mean() * torch.eye(gram.shape[0], dtype=gram.dtype)
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
