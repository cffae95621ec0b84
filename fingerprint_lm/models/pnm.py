"""Personalized Normalization Module (PNM): the user's fingerprint lives in decoder GroupNorms.

Two kinds of site, both on the decoder's main path (docs/design.md, "Methods"):

* ``affine`` sites (``norm2`` of ResnetBlocks, configurable): per-channel coefficients
  ``gamma_u = gamma_0 * (1 + A_l(w_u))``, ``beta_u = beta_0 + B_l(w_u)`` with ``w_u = M(f_u)``.
  They are plain GroupNorm weight/bias values, so a user's copy can be written as a stock
  ``AutoencoderKL``. Heads start at zero: a fresh PNM is exactly the base decoder.
* a ``spatial`` site (``conv_norm_out`` by default): a spatially varying bias map, as in SPADE,
  built from secret orthonormal +-1 carrier tiles whose signs the user's code sets. A fixed linear
  detector reads it from step 0, which is what lets training start from a readable signal instead
  of an extractor that learns from nothing (measured: joint training from scratch stalls at ~70%).

* ``conv`` sites (none by default; ``method=wouaf`` uses every decoder conv): WOUAF-style scales of
  a conv's input channels, ``conv((1 + s_u) * x)``, i.e. the stock conv with scaled weight columns.
* ``kernel`` sites (none by default): a per-user additive kernel over every weight value of a
  conv, spatial structure the per-channel sites cannot make; the stock conv with weight
  ``W (1 + s_u) + delta_u``. A head has ``mapping_hidden x weight.numel()`` parameters: fine for
  the tiny decoder's convs, hundreds of millions for one 512-channel SD conv.

The modules live in :mod:`fingerprint_lm.models.modulated`. The modulation for a batch is set on
the modulated modules right before decoding (one fingerprint per sample), so one forward pass
serves a batch of different users.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from fingerprint_lm.errors import ConfigError, check_float, check_int
from fingerprint_lm.models.modulated import (  # noqa: F401  (tile_to: re-exported for copies)
    _MODULATION_SLOTS,
    ModulatedConv2d,
    ModulatedGroupNorm,
    _modulated_modules,
    tile_to,
)

DEFAULT_AFFINE_SITES = ("up_blocks.*.resnets.*.norm2", "mid_block.resnets.*.norm2")


def _replace(root: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` at ``root``'s submodule path ``name`` (parameter names stay the same)."""
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


def _zero_head(width: int, outputs: int) -> nn.Linear:
    """A linear head that starts at zero, so that a fresh PNM reproduces the base decoder exactly."""
    head = nn.Linear(width, outputs)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return head


def hadamard_carriers(num_bits: int, dim: int, seed: int) -> torch.Tensor:
    """``num_bits`` mutually orthogonal +-1 vectors of length ``dim`` (secret: a seeded random
    subset of Hadamard rows with a seeded random column sign flip and permutation).

    Only the chosen entries of the Sylvester-Hadamard matrix are computed, from
    ``H[i, j] = (-1) ** popcount(i & j)``: the full matrix would be ``size**2`` floats, 4.3 GB at
    SD's ``conv_norm_out`` (128 channels x 16 x 16 tile = 32768), against 6 MB for 48 rows."""
    size = 1
    while size < dim:
        size *= 2
    if num_bits > size:
        raise ConfigError(f"cannot draw {num_bits} orthogonal carriers of length {dim}")
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randperm(size, generator=generator)[:num_bits]
    cols = torch.randperm(size, generator=generator)[:dim]
    flips = torch.randint(0, 2, (dim,), generator=generator) * 2 - 1
    common = rows[:, None] & cols[None, :]
    parity = torch.zeros_like(common)
    for _ in range(size.bit_length()):
        parity ^= common & 1
        common = common >> 1
    return (1 - 2 * parity).float() * flips


class MappingNetwork(nn.Module):
    """Private mapping ``M``: fingerprint bits (as +-1) -> a style vector ``w``.

    Parameters:
        fingerprint_bits: k.
        hidden: width of ``w``.
    """

    def __init__(self, fingerprint_bits: int, hidden: int = 128):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(fingerprint_bits, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU()
        )

    def forward(self, signs: torch.Tensor) -> torch.Tensor:
        return self.net(signs)


def _match(name: str, pattern: str) -> bool:
    parts, pats = name.split("."), pattern.split(".")
    return len(parts) == len(pats) and all(p == "*" or p == q for q, p in zip(parts, pats))


def _sites(modules: dict[str, nn.Module], patterns: Sequence[str], what: str) -> list[str]:
    """The sorted names of ``modules`` that match any of ``patterns``; a :class:`ConfigError`
    (``no decoder <what> [patterns]``) when patterns are given and none matches."""
    names = sorted(n for n in modules if any(_match(n, p) for p in patterns))
    if patterns and not names:
        raise ConfigError(f"no decoder {what} {list(patterns)}")
    return names


def check_decoder_settings(affine_sites: Sequence[str] = (), spatial_site: str | None = None, tile_size: int = 16,
                           carrier_amplitude: float = 0.3, mapping_hidden: int = 128, carrier_seed: int = 1234,
                           gradient_checkpointing: bool = False, modulation_bound: float | None = None,
                           conv_sites: Sequence[str] = (), kernel_sites: Sequence[str] = (),
                           kernel_bound: float = 0.03) -> None:
    """The types and ranges of :class:`PersonalizedDecoder`'s settings, written once: the decoder
    runs it when built, and a method when Hydra builds it (``method.pnm``), before anything trains.
    Whether the sites match modules of the decoder is checked when the decoder is built."""
    for name, patterns in (("affine_sites", affine_sites), ("conv_sites", conv_sites), ("kernel_sites", kernel_sites)):
        if isinstance(patterns, str) or not all(isinstance(p, str) for p in patterns):
            raise ConfigError(f"{name} must be a list of module names, got {patterns!r}")
    if spatial_site is not None and not isinstance(spatial_site, str):
        raise ConfigError(f"spatial_site must be a module name or null, got {spatial_site!r}")
    check_int("tile_size", tile_size)
    check_int("mapping_hidden", mapping_hidden)
    check_int("carrier_seed", carrier_seed, minimum=0)
    check_float("carrier_amplitude", carrier_amplitude, above=0.0)
    check_float("kernel_bound", kernel_bound, above=0.0)
    if modulation_bound is not None:
        check_float("modulation_bound", modulation_bound, above=0.0)
    if not isinstance(gradient_checkpointing, bool):
        raise ConfigError(f"gradient_checkpointing must be true or false, got {gradient_checkpointing!r}")


class PersonalizedDecoder(nn.Module):
    """A diffusers VAE decoder with a PNM. The base decoder's weights stay frozen by default.

    Parameters:
        decoder: ``AutoencoderKL.decoder`` (modified in place: GroupNorms at the sites are swapped
            for ``ModulatedGroupNorm`` with identical weights, so parameter names are unchanged).
        fingerprint_bits: k, the fingerprint length.
        affine_sites: glob-like module names (``*`` = one name part) of GroupNorms whose affine
            is modulated per channel. Empty to disable.
        spatial_site: module name of the GroupNorm that gets the carrier bias map, or None.
        tile_size: side of the carrier tile in pixels of the spatial site's resolution.
        carrier_amplitude: initial amplitude of each carrier (in normalised-feature units).
        mapping_hidden: width of the mapping network's output.
        carrier_seed: seed of the secret carriers.
        post_quant_conv: the VAE's ``post_quant_conv`` (None when the VAE has none), applied to the
            latents first, exactly as ``AutoencoderKL.decode`` does, so the PNM decoder at zero
            modulation is the user's decoder end to end.
        gradient_checkpointing: when gradients are on, recompute the mid block and each up block
            in the backward pass instead of storing their activations (``torch.utils.checkpoint``,
            non-reentrant). At SD scale (512 px) the stored activations of the up blocks are what
            fills GPU memory; the price is about one more decoder forward per backward. A plain
            attribute, not part of the checkpoint: set it per run.
        modulation_bound: None, or the largest relative change per affine value:
            ``scale, shift -> b * tanh(raw / b)``. Without it a message loss with no image loss yet
            drives the decoder into saturation (measured: PSNR ~7 dB, codes indistinguishable).
        conv_sites: glob-like module names of decoder convs whose input channels are scaled per
            user (WOUAF-style, ``ModulatedConv2d``; stock weights too). Empty to disable.
        kernel_sites: glob-like module names of decoder convs that get a per-user additive
            kernel, ``weight + kernel_bound * tanh(raw / kernel_bound)`` over every weight value
            (spatial structure the per-channel sites cannot make; stock weights too). Empty to
            disable.
        kernel_bound: the largest change of a kernel value at the kernel sites, in weight units.
    """

    def __init__(
        self,
        decoder: nn.Module,
        fingerprint_bits: int,
        affine_sites: Sequence[str] = DEFAULT_AFFINE_SITES,
        spatial_site: str | None = "conv_norm_out",
        tile_size: int = 16,
        carrier_amplitude: float = 0.3,
        mapping_hidden: int = 128,
        carrier_seed: int = 1234,
        post_quant_conv: nn.Module | None = None,
        gradient_checkpointing: bool = False,
        modulation_bound: float | None = None,
        conv_sites: Sequence[str] = (),
        kernel_sites: Sequence[str] = (),
        kernel_bound: float = 0.03,
    ):
        super().__init__()
        check_decoder_settings(affine_sites=affine_sites, spatial_site=spatial_site, tile_size=tile_size,
                               carrier_amplitude=carrier_amplitude, mapping_hidden=mapping_hidden,
                               carrier_seed=carrier_seed, gradient_checkpointing=gradient_checkpointing,
                               modulation_bound=modulation_bound, conv_sites=conv_sites, kernel_sites=kernel_sites,
                               kernel_bound=kernel_bound)
        self.modulation_bound = modulation_bound
        self.gradient_checkpointing = gradient_checkpointing
        self.fingerprint_bits = check_int("fingerprint length", fingerprint_bits)
        self.decoder = decoder
        self.post_quant_conv = post_quant_conv
        self.mapping = MappingNetwork(fingerprint_bits, mapping_hidden)

        norms = {n: m for n, m in decoder.named_modules() if isinstance(m, nn.GroupNorm)}
        self.affine_site_names = _sites(norms, affine_sites, "GroupNorm matches the PNM sites")
        if spatial_site is not None and spatial_site not in norms:
            raise ConfigError(f"spatial PNM site '{spatial_site}' is not a GroupNorm of the decoder")
        self.spatial_site_name = spatial_site

        for name in {*self.affine_site_names, *([spatial_site] if spatial_site else [])}:
            _replace(decoder, name, ModulatedGroupNorm.from_group_norm(norms[name]))

        convs = {n: m for n, m in decoder.named_modules() if isinstance(m, nn.Conv2d)}
        self.conv_site_names = _sites(convs, conv_sites, "conv matches the PNM conv sites")
        self.kernel_site_names = _sites(convs, kernel_sites, "conv matches the PNM kernel sites")
        self.kernel_bound = kernel_bound
        for name in {*self.conv_site_names, *self.kernel_site_names}:
            _replace(decoder, name, ModulatedConv2d.from_conv(convs[name]))

        self.affine_heads = nn.ModuleDict()
        for name in self.affine_site_names:
            self.affine_heads[name.replace(".", "__")] = _zero_head(mapping_hidden, 2 * norms[name].num_channels)

        self.conv_heads = nn.ModuleDict()
        for name in self.conv_site_names:
            self.conv_heads[name.replace(".", "__")] = _zero_head(mapping_hidden, convs[name].in_channels)
        self.kernel_heads = nn.ModuleDict()
        for name in self.kernel_site_names:
            self.kernel_heads[name.replace(".", "__")] = _zero_head(mapping_hidden, convs[name].weight.numel())

        if spatial_site is not None:
            channels = norms[spatial_site].num_channels
            self.tile_size = tile_size
            dim = channels * tile_size * tile_size
            carriers = hadamard_carriers(fingerprint_bits, dim, carrier_seed) / math.sqrt(dim)
            # Carriers and amplitudes are trainable: training may shape them, the start is readable.
            self.carriers = nn.Parameter(carriers.view(fingerprint_bits, channels, tile_size, tile_size))
            self.carrier_log_amplitude = nn.Parameter(
                torch.full((fingerprint_bits,), math.log(carrier_amplitude * math.sqrt(dim)))
            )

    # -- modulation -------------------------------------------------------------------------
    def modulation(self, bits: torch.Tensor) -> dict[str, dict[str, torch.Tensor]]:
        """Per-site coefficients for a batch of fingerprints ``bits`` [B,k] in {0,1}."""
        self.check_code(bits)
        signs = bits.to(self.mapping.net[0].weight.dtype) * 2 - 1
        style = self.mapping(signs)
        out: dict[str, dict[str, torch.Tensor]] = {}
        for name in self.affine_site_names:
            scale, shift = self.affine_heads[name.replace(".", "__")](style).chunk(2, dim=-1)
            out[name] = {"scale": self._bounded(scale), "shift": self._bounded(shift)}
        for name in self.conv_site_names:
            out[name] = {"in_scale": self._bounded(self.conv_heads[name.replace(".", "__")](style))}
        for name in self.kernel_site_names:
            raw = self.kernel_heads[name.replace(".", "__")](style)
            shape = self.decoder.get_submodule(name).weight.shape
            delta = self._bounded(raw, self.kernel_bound)
            out.setdefault(name, {})["weight_delta"] = delta.reshape(len(style), *shape)
        if self.spatial_site_name is not None:
            amplitude = self.carrier_log_amplitude.exp()
            bias_map = torch.einsum("bk,k,kchw->bchw", signs, amplitude, self.carriers)
            out.setdefault(self.spatial_site_name, {})["bias_map"] = bias_map
        return out

    def check_code(self, bits: torch.Tensor) -> None:
        """Refuse fingerprints [B,k] of another length than the model's."""
        if bits.shape[-1] != self.fingerprint_bits:
            raise ConfigError(
                f"fingerprint has {bits.shape[-1]} bits but this model was built for {self.fingerprint_bits}"
            )

    def _bounded(self, raw: torch.Tensor, bound: float | None = None) -> torch.Tensor:
        """``b * tanh(raw / b)`` with ``b = bound``, by default ``modulation_bound`` (None: ``raw``
        as it is); the kernel sites pass ``kernel_bound``."""
        bound = self.modulation_bound if bound is None else bound
        return raw if bound is None else bound * torch.tanh(raw / bound)

    @contextlib.contextmanager
    def fingerprinted(self, bits: torch.Tensor | None, carriers: bool = True) -> Iterator[None]:
        """Within the block, the decoder decodes with fingerprints ``bits`` (None: base decoder).
        ``carriers=False`` leaves out the spatial bias map (only the main-path affine part)."""
        modules = _modulated_modules(self.decoder)
        try:
            if bits is not None:
                for name, values in self.modulation(bits).items():
                    for key, value in values.items():
                        if carriers or key != "bias_map":
                            setattr(modules[name], key, value)
            yield
        finally:
            for module in modules.values():
                for slot in _MODULATION_SLOTS[type(module)]:
                    setattr(module, slot, None)

    def forward(self, latents: torch.Tensor, bits: torch.Tensor | None, carriers: bool = True) -> torch.Tensor:
        # A VAE loaded in bf16/fp16 decodes in its own dtype; callers keep theirs (fp32 losses).
        out_dtype = latents.dtype
        # contiguous: the posterior mode is a channel slice of the encoder's moments, and on torch
        # 2.13 CPU a backward pass through the decoder from such a strided view crashes (segfault;
        # experiments/stock_recipe_probe.py hit it). A copy of a latent batch costs nothing.
        latents = latents.to(self.decoder.conv_in.weight.dtype).contiguous()
        if self.post_quant_conv is not None:
            latents = self.post_quant_conv(latents)
        with self.fingerprinted(bits, carriers):
            if self.gradient_checkpointing and torch.is_grad_enabled():
                decoded = self._decode_checkpointed(latents)
            else:
                decoded = self.decoder(latents)
        return decoded.to(out_dtype)

    def _decode_checkpointed(self, latents: torch.Tensor) -> torch.Tensor:
        """``Decoder.forward`` (GroupNorm decoders, no latent embeddings) with the mid block and
        each up block checkpointed.

        diffusers' own ``gradient_checkpointing`` cannot be used: the modulation lives in
        attributes of the norms for the duration of ``fingerprinted`` only, so a recomputation in
        the backward pass would run without it. Each block here gets a closure holding its norms'
        modulation, set again when the block is recomputed."""
        decoder = self.decoder
        if not isinstance(decoder.conv_norm_out, nn.GroupNorm):
            raise ConfigError("gradient checkpointing of the PNM decoder needs a GroupNorm decoder (norm_type='group')")
        sample = decoder.conv_in(latents)
        for block in (decoder.mid_block, *decoder.up_blocks):
            sample = checkpoint(_ModulatedBlock(block), sample, use_reentrant=False)
        sample = decoder.conv_norm_out(sample)
        sample = decoder.conv_act(sample)
        return decoder.conv_out(sample)

    def pnm_parameters(self) -> list[nn.Parameter]:
        """The private PNM parameters (mapping, heads, carriers): never part of a user's copy."""
        params = [*self.mapping.parameters(), *self.affine_heads.parameters(), *self.conv_heads.parameters(),
                  *self.kernel_heads.parameters()]
        if self.spatial_site_name is not None:
            params += [self.carriers, self.carrier_log_amplitude]
        return params


class _ModulatedBlock:
    """A decoder block together with the modulation its modules hold now; calling it sets that
    modulation for the call (the first forward and the recomputation alike) and restores after."""

    def __init__(self, block: nn.Module):
        self.block = block
        self.modules = list(_modulated_modules(block).values())
        self.modulation = self._held()

    def _held(self) -> list[tuple]:
        return [tuple(getattr(m, slot) for slot in _MODULATION_SLOTS[type(m)]) for m in self.modules]

    def _set(self, values: list[tuple]) -> None:
        for module, held in zip(self.modules, values):
            for slot, value in zip(_MODULATION_SLOTS[type(module)], held):
                setattr(module, slot, value)

    def __call__(self, sample: torch.Tensor) -> torch.Tensor:
        current = self._held()
        try:
            self._set(self.modulation)
            return self.block(sample)
        finally:
            self._set(current)
