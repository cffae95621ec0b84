"""The distributor's content-dividing reader: pnm's band energies of an image, and the same energies
divided by those of the image as the base VAE re-makes it (docs/design.md, "Reading a found image").

pnm's mark is mostly a per-user gain on the content's own texture in the reader's secret bands, so
the content's energy in those bands is the noise each bit is read against. The distributor holds
the base VAE: encoding a found image and decoding it with the base gives the same content without
the user's gain, and the difference of the two log energies (the *ratio*) keeps mostly the gain. An
attack that acts on the whole image (blur, JPEG, noise) acts on the re-made image too, so part of
its effect divides out as well.

What it reads per band (``statistics``): ``energy``, the log energy of the band filter's response
(its colour weights summing the RGB channels), as the band reader reads; ``covariance``, also the
3 x 3 covariance of the channels' separate responses, as each channel's log variance and the three
correlations. pnm's gains act on decoder features that reach the colour channels in proportions of
their own, so a code moves how the colours co-vary in a band, not only the band's one energy
(experiments/results/colour_covariance_reader.md: clean bits 0.975 -> 0.985, blur 0.771 -> 0.834
on 8 shipped copies). The reads, those of the image and the same minus the re-made image's (the
*ratios*; ``2k`` numbers for ``energy``, ``14k`` for ``covariance``), are ZCA-whitened on unmarked
images and mapped to ``k`` logits by a readout with orthonormal rows, trained with BCE on marked
images of random codes (:func:`fit_readout`). Orthonormal rows keep white reads white, so the
logits of unmarked images stay decorrelated with unit variance; :class:`WhitenedReader`'s own
whitening then re-centres them at their median and the per-bit calibration scales them, as for the
band reader that trained with the decoder. Nothing about training changes: it reads the copies a
trained model already issues (experiments/results/ratio_reader.md: clean bits 0.944 -> 0.967 and
attribution 0.991 -> 0.999 on 8 shipped copies).

The base VAE it re-encodes with is attached, not stored: a checkpoint keeps it already
(``reference_vae/``, or ``base_vae/`` when training left the shared decoder alone).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.parametrizations import orthogonal

from fingerprint_lm.errors import ConfigError, DataError, check_int
from fingerprint_lm.models.pooled_extractor import WhitenedReader, band_log_energy, whitening_map
from fingerprint_lm.models.vae import decode_latents, encode_latents

# reads per band, of the image and of its ratio each: the band's log energy, and for ``covariance``
# also the three channels' log variances and their three correlations
READ_STATISTICS = {"energy": 1, "covariance": 7}


def band_colour_covariance(images: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``[B, 7, k]`` per band of the filter pairs ``weight`` ``[2k, 3, s, s]`` (cosine, sine): the log
    energy of the whole filter's response (:func:`band_log_energy`), the log variance of each colour
    channel's part of it, and the correlations of channels (0, 1), (0, 2), (1, 2); each summed over
    the pair and averaged over the valid positions. The energy is the sum of the channels' 3 x 3
    covariance, so it is one of these reads, not an extra."""
    pair, channels, s, _ = weight.shape
    # each filter's three channel slices applied to their own channel: [B, 3 * 2k, h, w], channel-major
    response = F.conv2d(images, weight.transpose(0, 1).reshape(channels * pair, 1, s, s), groups=channels)
    b, _, h, w = response.shape
    r = response.reshape(b, channels, pair // 2, 2 * h * w)  # a pair's two filters are adjacent
    cov = torch.einsum("bckn,bdkn->bkcd", r, r) / (h * w)  # [B, k, 3, 3]
    var = cov.diagonal(dim1=2, dim2=3).clamp_min(1e-8)
    corr = [cov[..., i, j] / (var[..., i] * var[..., j]).sqrt() for i, j in ((0, 1), (0, 2), (1, 2))]
    energy = torch.log(cov.sum(dim=(2, 3)).clamp_min(0) + 1e-8)
    return torch.cat([energy[:, None], var.log().transpose(1, 2), torch.stack(corr, 1)], 1)


def band_statistics(images: torch.Tensor, weight: torch.Tensor, statistics: str) -> torch.Tensor:
    """``[B, READ_STATISTICS[statistics] * k]``, grouped by statistic, then band: the energy first."""
    if statistics == "energy":
        return band_log_energy(images, weight)
    return band_colour_covariance(images, weight).flatten(1)


def statistics_of_width(width: int, fingerprint_bits: int) -> str:
    """The ``statistics`` whose reads are ``width`` numbers (a saved reader's ``feature_centre``)."""
    for name, per_band in READ_STATISTICS.items():
        if width == 2 * per_band * fingerprint_bits:
            return name
    raise RuntimeError(f"a content reader of {fingerprint_bits} bits reads no {width} numbers")


class ContentRatioReader(WhitenedReader):
    """Image -> ``fingerprint_bits`` logits from the band reader's filters ``band_weight``
    (``[2k, 3, s, s]``, copied from a trained :class:`BandEnergyExtractor`) and a base VAE
    (:meth:`attach_reference`) that re-makes each image's content.

    Its tensors (buffers: nothing here trains by gradient) are the filters, the reads' whitening
    (``feature_centre``, ``feature_matrix``), the readout (``readout``, ``[k, read_width]``) and the
    :class:`WhitenedReader` whitening and per-bit scale of the readout's logits. Until
    :func:`fit_readout`, the readout takes the image's own log energies: the band reader's raw logits."""

    def __init__(self, fingerprint_bits: int, filter_size: int = 7, gain: float = 3.0, statistics: str = "energy"):
        check_int("fingerprint length", fingerprint_bits)
        check_int("content reader filter_size", filter_size, 3)
        if statistics not in READ_STATISTICS:
            raise ConfigError(f"the content reader's statistics are one of {', '.join(READ_STATISTICS)}, "
                              f"got {statistics!r}")
        super().__init__(fingerprint_bits, gain)
        # what the band reader reads (a filter's side); the base VAE re-makes any such image, at the
        # nearest multiple of its downscale factor, and a band energy is a mean, whatever the size
        self.min_image_size = filter_size
        self.statistics = statistics
        k = fingerprint_bits
        self.read_width = 2 * READ_STATISTICS[statistics] * k  # the image's reads and their ratios
        self.register_buffer("band_weight", torch.zeros(2 * k, 3, filter_size, filter_size))
        self.register_buffer("feature_centre", torch.zeros(self.read_width))
        self.register_buffer("feature_matrix", torch.eye(self.read_width))
        # unfitted: the image's band energies (the first k reads), the band reader's raw logits
        self.register_buffer("readout", torch.cat([torch.eye(k), torch.zeros(k, self.read_width - k)], 1))
        self.reference: nn.Module | None = None

    def attach_reference(self, vae: nn.Module) -> ContentRatioReader:
        """Use ``vae`` (the base VAE as it was before training) to re-make each image's content. A
        submodule, so that moving the reader to a device moves it too; never saved with the reader
        (:meth:`own_state`)."""
        self.reference = vae
        return self

    def own_state(self) -> dict[str, torch.Tensor]:
        """The reader's state without the attached VAE's (which its checkpoint keeps already)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("reference.")}

    def load_own_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load :meth:`own_state`: every tensor of the reader and nothing else."""
        missing, unexpected = self.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("reference.")]
        if missing or unexpected:
            raise RuntimeError(f"content reader state: missing {missing[:3]}, unexpected {unexpected[:3]}")

    @torch.no_grad()
    def remade(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` encoded (posterior mode) and decoded by the attached base VAE."""
        if self.reference is None:
            raise ConfigError("the content reader has no base VAE attached (attach_reference)")
        latents = encode_latents(self.reference, images)  # each in the VAE's own dtype, float32 back
        return decode_latents(self.reference, latents).to(images.dtype)

    def reads(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, read_width]``: the band statistics of ``images`` and those minus the re-made images'."""
        self.check_images(images)
        own = band_statistics(images.float(), self.band_weight, self.statistics)
        remade = band_statistics(self.remade(images.float()), self.band_weight, self.statistics)
        return torch.cat([own, own - remade], 1)

    def whitened_reads(self, reads: torch.Tensor) -> torch.Tensor:
        return (reads - self.feature_centre) @ self.feature_matrix.T

    def raw_from_reads(self, reads: torch.Tensor) -> torch.Tensor:
        """The readout's raw logits of images whose :meth:`reads` are ``reads`` (fits keep the reads)."""
        return self.whitened_reads(reads) @ self.readout.T

    def raw_logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.raw_from_reads(self.reads(images))

    def logits_from_reads(self, reads: torch.Tensor) -> torch.Tensor:
        """What :meth:`forward` gives for images whose :meth:`reads` are ``reads``."""
        return self.logits_from_raw(self.raw_from_reads(reads))


def content_reader_from(band_reader: WhitenedReader, reference: nn.Module,
                        statistics: str = "energy") -> ContentRatioReader:
    """A :class:`ContentRatioReader` with ``band_reader``'s filters (a band-energy reader) and its
    gain, reading ``statistics``, re-making content with ``reference``; its readout not fitted yet."""
    weight = getattr(band_reader, "weight", None)
    if weight is None or weight.ndim != 4 or weight.shape[0] != 2 * band_reader.fingerprint_bits:
        raise ConfigError(f"the content reader reads a band-energy reader's filters; "
                          f"{type(band_reader).__name__} has none")
    reader = ContentRatioReader(band_reader.fingerprint_bits, weight.shape[-1], float(band_reader.gain), statistics)
    reader.band_weight.copy_(weight.detach())
    return reader.to(weight.device).attach_reference(reference)


@torch.no_grad()
def fit_readout(reader: ContentRatioReader, unmarked: torch.Tensor, marked: torch.Tensor, codes: torch.Tensor,
                steps: int = 1500, seed: int = 0, weights: torch.Tensor | None = None) -> float:
    """Fit ``reader``'s read whitening on the ``unmarked`` reads ``[n, read_width]``, train its readout's
    orthonormal rows by full-batch BCE on the ``marked`` reads ``[m, read_width]`` of ``codes`` ``[m, k]``
    (Adam, lr 1e-2, a learned logit scale from 3), then whiten its logits on the unmarked reads
    (median centre: fair bits). ``weights`` ``[m]``, if given, weigh each marked read's loss
    (attacked reads beside clean ones). The per-bit calibration is the caller's. Returns the
    readout's bit accuracy on the marked reads."""
    k, width = reader.fingerprint_bits, reader.read_width
    if unmarked.ndim != 2 or unmarked.shape[1] != width or marked.shape[1:] != unmarked.shape[1:]:
        raise DataError(f"the content reader fits [n, {width}] reads, got {tuple(unmarked.shape)} "
                        f"and {tuple(marked.shape)}")
    if codes.shape != (len(marked), k):
        raise DataError(f"{len(marked)} marked reads need [{len(marked)}, {k}] codes, got {tuple(codes.shape)}")
    if weights is not None and (weights.shape != (len(marked),) or not bool((weights >= 0).all())
                                or not bool(weights.sum() > 0)):
        raise DataError(f"{len(marked)} marked reads need [{len(marked)}] weights >= 0, not all 0")
    centre, matrix = whitening_map(unmarked.double(), "median")
    reader.feature_centre.copy_(centre.to(reader.feature_centre))
    reader.feature_matrix.copy_(matrix.to(reader.feature_matrix))
    white = reader.whitened_reads(marked.to(reader.feature_centre)).float().cpu()
    target = codes.float().cpu()
    row_weight = None if weights is None else (weights.float().cpu() / weights.float().mean())[:, None]
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # the rows' initial draw; the caller's random stream is given back below
    rows = orthogonal(nn.Linear(width, k, bias=False))
    torch.random.set_rng_state(generator_state)
    scale = nn.Parameter(torch.tensor(3.0))
    optimizer = torch.optim.Adam([*rows.parameters(), scale], lr=1e-2)
    with torch.enable_grad():
        for _ in range(steps):  # full batch: a few thousand reads of 2k (14k) numbers
            loss = F.binary_cross_entropy_with_logits(scale * rows(white), target, weight=row_weight)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    reader.readout.copy_(rows.weight.detach().to(reader.readout))
    reader.fit_whitening_raw(reader.raw_from_reads(unmarked.to(reader.feature_centre)).float().cpu())
    return float(((white @ rows.weight.detach().T > 0).float() == target).float().mean())


class LossReader(nn.Module):
    """A reader a training loss reads through (a later cycle's ``read_with: content_reader``):
    ``reader``'s logits, with none of its tensors, nor the base VAE attached to it, registered here,
    so that no optimizer, ``requires_grad_`` or weight perturbation of the training module reaches
    them; it follows the images to their device."""

    def __init__(self, reader: nn.Module):
        super().__init__()
        self._reader = (reader,)  # a tuple: not a submodule
        self.fingerprint_bits = reader.fingerprint_bits

    @property
    def reader(self) -> nn.Module:
        return self._reader[0]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if next(self.reader.buffers()).device != images.device:
            self.reader.to(images.device)
        return self.reader(images)
