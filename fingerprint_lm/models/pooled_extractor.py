"""A shift-invariant fingerprint extractor: convolutions, global average pooling, a linear head
(the shape of HiDDeN's decoder), and logits whitened on unmarked images.

A mark held in a decoder's per-channel weights is the same everywhere in an image (the decoder is
translation-equivariant), so the reader should be too: stride-1 convolutions with circular
padding commute with circular shifts, and the global average pool forgets where a feature was.
The output is therefore exactly invariant to a circular shift of the input, and changes only
through border effects under a crop or a plain shift. It reads any image of at least
:data:`MIN_SIZE` pixels a side.

Whitening (:meth:`WhitenedReader.fit_whitening`) makes the logits of unmarked images decorrelated
with unit variance and median 0, so that threshold 0 is valid and an unmarked image gives
balanced, independent-looking bits: what attribution's binomial p-values assume.

Bit calibration (:meth:`WhitenedReader.calibrate_bit_slopes`) then scales each whitened logit by
that bit's fitted logistic slope on marked images (``bit_scale``), so a logit is its bit's
log-likelihood ratio: soft attribution weighs the reliable bits more. A positive per-bit scale
keeps the signs (the hard bits), the zero median and the decorrelation; unmarked logits then have
standard deviation ``gain * bit_scale`` instead of ``gain``.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from fingerprint_lm.errors import ConfigError, DataError, check_int
from fingerprint_lm.models.batched import evaluating

MIN_SIZE = 16
WHITENING_CENTRES = ("median", "mean")


@torch.no_grad()
def whitening_map(raw: torch.Tensor, centre: str = "median", decorrelate: bool = True,
                  eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """``(m, W)`` such that ``W (raw - m)`` is white on the unmarked logits ``raw`` ``[n, k]``
    (float64): ``W = C^{-1/2}``, symmetric (the ZCA map: of all whitenings, the one that moves the
    logits least), from an eigendecomposition of their covariance ``C``, or ``diag(1 / std)``
    without ``decorrelate``; ``centre`` puts the whitened logits' median or mean at 0. Needs more
    images than logits."""
    if len(raw) <= raw.shape[1]:
        raise DataError(f"whitening {raw.shape[1]} logits needs more than {raw.shape[1]} unmarked images, "
                        f"got {len(raw)}")
    raw = raw.double()
    mean = raw.mean(0)
    centred = raw - mean
    covariance = centred.T @ centred / (len(raw) - 1)
    if not decorrelate:  # per-logit standardisation: W = diag(1 / std)
        covariance = torch.diag(torch.diag(covariance))
    values, vectors = torch.linalg.eigh(covariance)
    # eps relative to the largest variance: a direction the extractor never varies along stays
    # bounded instead of being blown up by 1/sqrt(~0).
    floor = eps * values.max().clamp_min(torch.finfo(values.dtype).tiny)
    clamped = values.clamp_min(floor)
    inverse_sqrt = vectors @ torch.diag(clamped.rsqrt()) @ vectors.T
    # "median": every bit of an unmarked image is a fair coin, P[logit > 0] = 1/2 (log-energies
    # are skewed: 0.569 of the bits of 10^4 unmarked images were 1 with the mean); "mean":
    # zero-mean logits. Attribution's false-accusation bound needs neither: an innocent's code
    # is uniform and independent of the image, so its matches are Binomial(k, 1/2) whatever
    # the image's bits are. Fair bits keep an unmarked image from looking like anyone's code.
    if centre == "median":
        median = (centred @ inverse_sqrt.T).median(dim=0).values
        return mean + vectors @ torch.diag(clamped.sqrt()) @ vectors.T @ median, inverse_sqrt
    return mean, inverse_sqrt


def bit_slopes(logits: torch.Tensor, bits: torch.Tensor, prior: float = 1.0, min_slope: float = 0.05,
               max_slope: float = 100.0) -> torch.Tensor:
    """Per bit j, the slope ``a_j`` of the logistic fit ``P(bit_j = 1 | l_j) = sigmoid(a_j l_j)`` on
    ``logits`` / ``bits`` ``[n, k]`` (float64), with a Gaussian prior of precision ``prior`` around 1
    so that a bit read perfectly on a small fit set keeps a finite slope; within
    [``min_slope``, ``max_slope``], so that no bit's sign flips. The log-posterior's derivative falls
    strictly with ``a_j``, so its root is found by bisection (Newton's method, unguarded, ran off on
    a bit the logit does not predict). Measured on the shipped pnm reader: clean soft attribution
    0.901 -> 0.933 (experiments/results/calibrated_soft_attribution.md)."""
    if logits.shape != bits.shape or logits.ndim != 2 or len(logits) == 0:
        raise ConfigError(f"bit slopes need same-shaped [n, k] logits and bits, got {tuple(logits.shape)} "
                          f"and {tuple(bits.shape)}")
    x, y = logits.double(), bits.double()
    low = torch.full((x.shape[1],), float(min_slope), dtype=torch.float64, device=x.device)
    high = torch.full_like(low, float(max_slope))
    for _ in range(60):  # (100 - 0.05) / 2^60: far below float64's resolution of a slope
        mid = (low + high) / 2
        rising = (x * (y - torch.sigmoid(x * mid))).sum(0) - prior * (mid - 1) > 0
        low = torch.where(rising, mid, low)
        high = torch.where(rising, high, mid)
    return (low + high) / 2


class WhitenedReader(nn.Module):
    """Raw per-image logits (``raw_logits``, defined by subclasses) whitened on unmarked images
    and scaled per bit: ``logits = gain * bit_scale * W (raw - mean)``; identity until
    :meth:`fit_whitening` and :meth:`calibrate_bit_slopes`."""

    min_image_size = MIN_SIZE

    def __init__(self, fingerprint_bits: int, gain: float = 1.0, centre: str = "median", decorrelate: bool = True):
        super().__init__()
        if centre not in WHITENING_CENTRES:
            raise ConfigError(f"the whitening centre must be one of {', '.join(WHITENING_CENTRES)}, got {centre!r}")
        self.fingerprint_bits = fingerprint_bits
        self.gain = gain
        self.centre = centre
        self.decorrelate = decorrelate
        self.register_buffer("whiten_mean", torch.zeros(fingerprint_bits))
        self.register_buffer("whiten_matrix", torch.eye(fingerprint_bits))
        self.register_buffer("bit_scale", torch.ones(fingerprint_bits))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # a reader saved before per-bit calibration (2026-12-06) has no bit_scale: it is uncalibrated
        state_dict.setdefault(f"{prefix}bit_scale", torch.ones_like(self.bit_scale))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def check_images(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or min(images.shape[-2:]) < self.min_image_size:
            raise DataError(
                f"the extractor reads [B, C, H, W] images of at least {self.min_image_size} px a side, "
                f"got {tuple(images.shape)}"
            )

    def raw_logits(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.logits_from_raw(self.raw_logits(images))

    def logits_from_raw(self, raw: torch.Tensor) -> torch.Tensor:
        """The logits of images whose raw logits are ``raw`` (fits that keep the raw logits use it)."""
        # (gain * x) @ W' first, as before bit_scale existed: an uncalibrated reader's logits keep their bits
        return self.gain * (raw - self.whiten_mean) @ self.whiten_matrix.T * self.bit_scale

    @torch.no_grad()
    def fit_whitening(self, unmarked: torch.Tensor, batch_size: int = 256, eps: float = 1e-6) -> None:
        """Fit ``W = C^{-1/2}`` (symmetric, through an eigendecomposition of the covariance C of
        the raw logits) and a centre (``self.centre``: the whitened logits' median or mean at 0), on unmarked
        images; needs more images than bits."""
        self.fit_whitening_chunks(unmarked.split(batch_size), eps)

    @torch.no_grad()
    def fit_whitening_chunks(self, chunks, eps: float = 1e-6) -> None:
        """:meth:`fit_whitening` from an iterable of unmarked image batches (each read in eval
        mode on this reader's device; only the raw logits are kept, on the CPU)."""
        device = self.whiten_mean.device
        with evaluating(self):
            raw = [self.raw_logits(chunk.to(device)).float().cpu() for chunk in chunks]
        self.fit_whitening_raw(torch.cat(raw), eps)

    @torch.no_grad()
    def fit_whitening_raw(self, raw: torch.Tensor, eps: float = 1e-6) -> None:
        """:meth:`fit_whitening` from the raw logits ``[n, k]`` of unmarked images (callers that
        decode images batch by batch keep only these, not the images)."""
        centre, matrix = whitening_map(raw, self.centre, self.decorrelate, eps)
        self.whiten_mean.copy_(centre.to(self.whiten_mean.dtype))
        self.whiten_matrix.copy_(matrix.to(self.whiten_matrix.dtype))

    @torch.no_grad()
    def calibrate_bit_slopes(self, logits: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
        """Scale each bit's logit by :func:`bit_slopes` of this reader's ``logits`` ``[n, k]`` of
        marked images whose codes were ``bits`` (on top of any earlier scale, which those logits
        include). Re-fitting the whitening keeps the scale. Returns the slopes."""
        slopes = bit_slopes(logits, bits)
        self.bit_scale.mul_(slopes.to(self.bit_scale))
        return slopes

    def soft_weights(self, logits: torch.Tensor) -> torch.Tensor:
        """What ``soft_whitened`` decoding weighs each bit by: these logits as whitened, without the
        per-bit calibration (``soft`` reads them with it). The calibration weighs each bit by how
        reliably it reads one user's image; in a blend of two users' images which bits carry the
        evidence depends on where the codes agree instead, and the plain whitened weights trace
        such blends better (experiments/results/calibrated_soft_attribution.md)."""
        return logits / self.bit_scale


class PooledExtractor(WhitenedReader):
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
        for name, value in (("fingerprint length", fingerprint_bits), ("extractor width", width),
                            ("extractor depth", depth)):
            check_int(name, value)
        super().__init__(fingerprint_bits)
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

    def raw_logits(self, images: torch.Tensor) -> torch.Tensor:
        self.check_images(images)
        return self.head(self.features(images).mean(dim=(2, 3)))


class BandEnergyExtractor(WhitenedReader):
    """A fixed (untrained) shift-invariant reader: bit ``i`` is the log energy of the image in a
    secret band, a Gabor pair (cosine and sine, so the energy ignores phase) at a secret spatial
    frequency and orientation, applied to a secret colour direction; whitened on unmarked images.

    Why fixed: a learned reader starts from nothing, and jointly learning it with the decoder's
    modulation stalled near 0.6-0.69 bit accuracy here (experiments/stock_recipe_probe.py). A
    fixed reader gives the generator a readable target from step 0, as the carrier tiles do, but
    one that does not care where the texture is: the energy is a mean over valid positions
    (unpadded convolution), so a shift leaves it unchanged and a crop changes it only by sampling.

    With ``learn_filters`` the secret bank is only where the filters start: they train with the
    mapping network (the reader stays convolution + mean energy, so it stays shift-invariant).
    Readers learned from nothing stalled; one warm-started from the bank, trained together with
    the shared decoder, reads what the decoder learns to write (experiments/band_energy_probe.py
    ``--reader-lr 1e-3 --decoder-lr 5e-4``, 5000 steps: 0.871 at 30.0 dB vs 0.713 for the fixed
    bank). With the decoder frozen it does not help (0.537 after 2000 steps).

    Parameters:
        fingerprint_bits: k.
        filter_size: side of the Gabor filters (also the smallest readable image).
        frequency: range of the secret frequencies, cycles per pixel.
        seed: seed of the secret bands (frequency, orientation, colour).
        gain: logit scale after whitening (BCE saturation during training).
        learn_filters: train the filters (from the secret bank) instead of keeping them fixed.
        centre: where the whitening puts threshold 0: the unmarked logits' ``median`` or ``mean``
            (:meth:`WhitenedReader.fit_whitening_raw`).
        colour: each band's colour direction: ``random`` (a secret unit RGB vector per band) or
            ``luma`` (every band along BT.601 luma, which JPEG's 4:2:0 chroma subsampling keeps;
            experiments/results/jpeg_chroma_probe.md).
    """

    def __init__(self, fingerprint_bits: int, filter_size: int = 7, frequency: tuple[float, float] = (0.12, 0.35),
                 seed: int = 5, gain: float = 3.0, learn_filters: bool = False, centre: str = "median",
                 decorrelate: bool = True, colour: str = "random"):
        check_int("fingerprint length", fingerprint_bits)
        check_int("band reader filter_size", filter_size, 3)
        super().__init__(fingerprint_bits, gain, centre, decorrelate)
        self.min_image_size = filter_size
        generator = torch.Generator().manual_seed(seed)
        low, high = frequency
        radius = low + (high - low) * torch.rand(fingerprint_bits, generator=generator)
        angle = math.pi * torch.rand(fingerprint_bits, generator=generator)
        if colour not in ("random", "luma"):
            raise ConfigError(f"band reader colour must be random or luma, got {colour!r}")
        # drawn either way, so that a luma reader's frequencies and orientations are the random one's
        directions = F.normalize(torch.randn(fingerprint_bits, 3, generator=generator), dim=1)
        if colour == "luma":
            directions = F.normalize(torch.tensor([0.299, 0.587, 0.114]), dim=0).expand(fingerprint_bits, 3).clone()
        # The secret bands, kept to describe them (tests plant textures in them); the filters below are what reads.
        self.register_buffer("band_frequency", radius, persistent=False)
        self.register_buffer("band_angle", angle, persistent=False)
        self.register_buffer("band_colour", directions, persistent=False)
        bank = gabor_bank(radius, angle, directions, filter_size)
        # One state-dict key either way, so a checkpoint loads whichever way it was trained.
        if learn_filters:
            self.weight = nn.Parameter(bank)
        else:
            self.register_buffer("weight", bank)

    def raw_logits(self, images: torch.Tensor) -> torch.Tensor:
        self.check_images(images)
        return band_log_energy(images.to(self.weight.dtype), self.weight)


def gabor_bank(radius: torch.Tensor, angle: torch.Tensor, colour: torch.Tensor, size: int) -> torch.Tensor:
    """Conv weights ``[2n, 3, size, size]`` of ``n`` bands: for band ``j`` a Gaussian-windowed
    cosine and sine at ``radius[j]`` cycles per pixel and orientation ``angle[j]``, each with unit
    norm, applied to the colour direction ``colour[j]`` (``[n, 3]``). The cosine has no DC part:
    brightness is not a band."""
    axis = torch.arange(size) - (size - 1) / 2
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")
    window = torch.exp(-(xx**2 + yy**2) / (2 * (size / 4) ** 2))
    direction = torch.cos(angle)[:, None, None] * xx + torch.sin(angle)[:, None, None] * yy
    phase = 2 * math.pi * radius[:, None, None] * direction
    cos, sin = window * torch.cos(phase), window * torch.sin(phase)
    cos = cos - cos.mean(dim=(1, 2), keepdim=True) * window / window.mean()
    pair = torch.stack([cos, sin], 1)
    pair = pair / pair.flatten(1).norm(dim=1)[:, None, None, None]
    weight = pair[:, :, None] * colour[:, None, :, None, None]  # [n, 2, 3, s, s]
    return weight.reshape(-1, 3, size, size)


def band_log_energy(images: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Per image, the log of the mean energy (cosine^2 + sine^2) of each band of a
    :func:`gabor_bank` over the valid positions: ``[B, n]``."""
    response = F.conv2d(images, weight)
    b, _, h, w = response.shape
    energy = response.view(b, -1, 2, h, w).pow(2).sum(2).mean(dim=(2, 3))
    return torch.log(energy + 1e-8)
