"""A shift-invariant fingerprint extractor: convolutions, global average pooling, a linear head
(the shape of HiDDeN's decoder), and logits whitened on unmarked images.

A mark held in a decoder's per-channel weights is the same everywhere in an image (the decoder is
translation-equivariant), so the reader should be too: stride-1 convolutions with circular
padding commute with circular shifts, and the global average pool forgets where a feature was.
The output is therefore exactly invariant to a circular shift of the input, and changes only
through border effects under a crop or a plain shift. It reads any image of at least
:data:`MIN_SIZE` pixels a side.

Whitening (:meth:`PooledExtractor.fit_whitening`) makes the logits of unmarked images zero-mean
and decorrelated with unit variance, so that threshold 0 is valid and an unmarked image gives
balanced, independent-looking bits: what attribution's binomial p-values assume.
"""

from __future__ import annotations

import torch
from torch import nn

from fingerprint_lm.errors import ConfigError, DataError

MIN_SIZE = 16


class PooledExtractor(nn.Module):
    """Image -> ``fingerprint_bits`` logits, invariant to circular shifts.

    Parameters:
        fingerprint_bits: k, the number of logits.
        width: channels of every convolution.
        depth: number of conv3x3 -> BatchNorm -> GELU stages (stride 1, circular padding).
        in_channels: image channels.

    BatchNorm, not GroupNorm: GroupNorm normalises each image's feature statistics away, and a
    per-channel decoder modulation shows up precisely as such statistics.
    """

    def __init__(self, fingerprint_bits: int, width: int = 64, depth: int = 4, in_channels: int = 3):
        super().__init__()
        if fingerprint_bits <= 0 or width <= 0 or depth <= 0:
            raise ConfigError(f"the extractor needs positive sizes, got bits={fingerprint_bits} width={width} depth={depth}")
        self.fingerprint_bits = fingerprint_bits
        layers: list[nn.Module] = []
        prev = in_channels
        for _ in range(depth):
            layers += [
                nn.Conv2d(prev, width, 3, padding=1, padding_mode="circular"),
                nn.BatchNorm2d(width),
                nn.GELU(),
            ]
            prev = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(width, fingerprint_bits)
        # Identity until fit_whitening: logits = W (raw - mean).
        self.register_buffer("whiten_mean", torch.zeros(fingerprint_bits))
        self.register_buffer("whiten_matrix", torch.eye(fingerprint_bits))

    def raw_logits(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or min(images.shape[-2:]) < MIN_SIZE:
            raise DataError(
                f"the extractor reads [B, C, H, W] images of at least {MIN_SIZE} px a side, got {tuple(images.shape)}"
            )
        return self.head(self.features(images).mean(dim=(2, 3)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (self.raw_logits(images) - self.whiten_mean) @ self.whiten_matrix.T

    @torch.no_grad()
    def fit_whitening(self, unmarked: torch.Tensor, batch_size: int = 256, eps: float = 1e-6) -> None:
        """Fit ``mean`` and ``W = C^{-1/2}`` (symmetric, through an eigendecomposition of the
        covariance C of the raw logits) on unmarked images; needs more images than bits."""
        if len(unmarked) <= self.fingerprint_bits:
            raise DataError(
                f"whitening {self.fingerprint_bits} logits needs more than {self.fingerprint_bits} unmarked images, "
                f"got {len(unmarked)}"
            )
        was_training = self.training
        self.eval()
        raw = torch.cat([self.raw_logits(unmarked[i : i + batch_size]) for i in range(0, len(unmarked), batch_size)])
        self.train(was_training)
        raw = raw.double()
        mean = raw.mean(0)
        centred = raw - mean
        covariance = centred.T @ centred / (len(raw) - 1)
        values, vectors = torch.linalg.eigh(covariance)
        # eps relative to the largest variance: a direction the extractor never varies along stays
        # bounded instead of being blown up by 1/sqrt(~0).
        floor = eps * values.max().clamp_min(torch.finfo(values.dtype).tiny)
        inverse_sqrt = vectors @ torch.diag(values.clamp_min(floor).rsqrt()) @ vectors.T
        self.whiten_mean.copy_(mean.to(self.whiten_mean.dtype))
        self.whiten_matrix.copy_(inverse_sqrt.to(self.whiten_matrix.dtype))
