"""Scoring one point of the collusion grid: (ACT type x attack x colluders) on a trained model.

A point issues ``colluders`` fresh users (one ACT seed each; codes drawn and screened as
``task=issue`` screens them when the checkpoint records a screen, by its read predictor or on the
probe: ``distributor/issue_screens.py``; else uniform) beside uniform innocents,
builds their copies with :func:`~fingerprint_lm.methods.base.personal_tensors`, applies the point's
attack and decodes held-out images with the result. The attack is one of

- ``none``: the (first) copy itself;
- a merge of the ``c`` copies (:data:`~fingerprint_lm.attacks.collusion.MERGES`: ``average``,
  ``aligned_average`` (the adaptive colluder), ``max_abs``, ...): state dicts and bias maps merged
  together (stream ACT permutes the bias map's channels with the last segment);
- image collusion (:data:`~fingerprint_lm.attacks.collusion.IMAGE_MERGES`): ``image_mix`` (each
  image from one colluder's copy) or ``image_blend`` (the pixelwise mean of their images of the same content);
- an image attack (:data:`~fingerprint_lm.attacks.image.IMAGE_ATTACKS`) on the copy's outputs;
- a model attack on the (first) copy's tensors, bias map included (the user holds both files):
  ``weight_noise`` (relative std), ``prune`` (fraction), ``quantize_int8|fp16|bf16``,
  ``finetune`` (steps of reconstruction-only fine-tuning);
- ``estimate_remove``: removal by estimation from the copy's own outputs, period = the tile size;
- ``spectral_remove[_<strength>]``: the copy's outputs filtered so that their mean amplitude
  spectrum becomes that of the attacker's own unmarked images (the fine-tuning attacker's set).

The steps are separate functions (:func:`draw_users`, :func:`attacked_images`, :func:`score`) so an
analysis script can take the images a point scores (:class:`PointImages`) without re-running it.
Attribution and tracing are the distributor's own (:mod:`fingerprint_lm.distributor.attribution`),
at ``fpr`` times the screen's pass rate for screened codes, as the distributor tests them (the
checkpoint's rate: the sweep has no registry count to take the smaller of).
Hydra's basic sweeper takes the cartesian product of its lists, so attack, strength and colluder
count travel as one case string (:func:`~fingerprint_lm.attacks.cases.parse_case`): ``none_c1``, ``average_c3``,
``jpeg_q50``...
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch

from fingerprint_lm.attacks import model as model_attacks
from fingerprint_lm.attacks.cases import BUILTIN_ATTACKS, attack_kind, check_point, parse_case
from fingerprint_lm.attacks.collusion import IMAGE_MERGES, MERGES, merge_copies
from fingerprint_lm.attacks.image import IMAGE_ATTACKS
from fingerprint_lm.attacks.plugins import check_image_merge_output, checked_state_output
from fingerprint_lm.config_schema import SCREENS
from fingerprint_lm.data.synthetic import ProceduralImages
from fingerprint_lm.distributor.attribution import attribute_logits, code_null, trace_logits, whitened_weights
from fingerprint_lm.distributor.copies import decoder_from_tensors
from fingerprint_lm.distributor.issue_screens import screened_codes
from fingerprint_lm.errors import ConfigError, check_choice, check_float, check_int, check_probability
from fingerprint_lm.methods.base import personal_tensors
from fingerprint_lm.metrics.fid import frechet_distance_proxy
from fingerprint_lm.metrics.quality import psnr, ssim
from fingerprint_lm.models import batched
from fingerprint_lm.models.act import ACT_TYPES
from fingerprint_lm.models.checkpoint import FingerprintModel
from fingerprint_lm.registry.index import CodeIndex
from fingerprint_lm.registry.soft import DECODINGS, code_p_values

# Held-out images of the sweep: a stream seed no training, validation, test or fid_proxy set uses
# (those are run seed + 0 / 1_000_003 / 2_000_003, and 10_000 + proxy seed).
SWEEP_IMAGE_SEED = 5_000_011
FINETUNE_IMAGE_SEED = 6_000_013  # the attacker's own fine-tuning images


# -- what a point is ------------------------------------------------------------------------------
@dataclass(frozen=True)
class Point:
    """One grid point: the colluders' ACT type and the attack (see the module docstring)."""

    act: str
    attack: str
    attack_strength: float | None = None
    colluders: int = 1

    def __post_init__(self) -> None:
        if self.act not in ACT_TYPES:
            raise ConfigError(f"unknown ACT type {self.act!r}; expected one of {', '.join(ACT_TYPES)}")
        check_point(self.attack, self.attack_strength, self.colluders)

    @classmethod
    def from_case(cls, act: str, case: str) -> Point:
        return cls(act, *parse_case(case))


@dataclass(frozen=True)
class PointSettings:
    """How a point is evaluated (``sweep.*`` of the config)."""

    n_images: int = 256
    n_innocents: int = 1000
    fpr: float = 1e-6  # attribution (Bonferroni over the registry) and the one-code detection test
    tracing_fpr: float = 1e-3
    decoding: str = "soft"  # per-image attribution and the one-code test (registry/soft.py)
    scale_range: tuple[float, float] = (0.25, 4.0)
    act_scope: str = "stream"
    finetune_lr: float = 1e-4
    screen_codes: bool = True  # colluders' codes screened as task=issue screens them, if the checkpoint has a screen
    screen_by: str = "auto"  # which screen (distributor/issue_screens.py: choose_screen)
    device: str | torch.device = "cpu"  # where decoders and the extractor run; metrics on the CPU

    def __post_init__(self) -> None:
        check_int("n_images", self.n_images, 2)
        check_int("n_innocents", self.n_innocents, 0)
        check_probability("fpr", self.fpr)
        check_probability("tracing_fpr", self.tracing_fpr)
        check_choice("decoding", self.decoding, DECODINGS)
        check_choice("screen_by", self.screen_by, SCREENS)
        check_float("finetune_lr", self.finetune_lr, above=0.0)


@dataclass
class Users:
    """The users a point draws: colluders first, then innocents; the colluders' copy tensors."""

    codes: np.ndarray  # uint8 [colluders + innocents, k]
    user_ids: list[str]
    index: CodeIndex
    copies: list[tuple[dict[str, torch.Tensor], torch.Tensor | None, str | None]]  # (state, bias map, site)
    issue_seconds: float = 0.0  # wall time per copy made (a per-copy training run, or the code screen as it first ran)
    screen_pass_rate: float | None = None  # the colluders' codes were screened with this pass rate

    @property
    def colluder_ids(self) -> set[str]:
        return set(self.user_ids[: len(self.copies)])


@dataclass
class PointImages:
    """What a point scores: the held-out images, the base decoder's outputs, the attacked outputs
    and the reference their quality is measured against (the base outputs, cut the same way for
    crops and shifts)."""

    real: torch.Tensor
    base_outputs: torch.Tensor
    outputs: torch.Tensor
    reference: torch.Tensor


@dataclass
class PointResult:
    """A point's metrics (:meth:`as_dict`: the keys of a sweep job's ``metrics.json``)."""

    method: str
    fingerprint_bits: int
    act: str
    act_scope: str
    attack: str
    attack_strength: float | None
    colluders: int
    n_images: int
    registry_size: int
    bit_acc: float
    bit_acc_min: float
    bit_acc_max: float
    attribution_acc: float
    tpr_at_fpr: float  # per-image detection of the first colluder's code (one code; fpr x the screen's pass rate)
    false_positives: float  # the same test on the base decoder's outputs
    tracing_caught: int
    tracing_innocents_accused: int
    tardos_caught: int  # the symmetric Tardos score of the images' majority bits, same fpr
    tardos_innocents_accused: int
    psnr: float
    ssim: float
    fid_proxy: float | None = None
    fid_proxy_base: float | None = None
    issue_seconds: float = 0.0  # per copy; a memoised per-copy training (stable_signature) is nearly free
    screen_pass_rate: float | None = None  # the colluders' codes screened (attribution at fpr x rate); None: uniform
    seconds: float = 0.0
    images: PointImages | None = field(default=None, repr=False)
    users: Users | None = field(default=None, repr=False)  # who the point drew: codes and registry

    def as_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("images", "users", "tpr_at_fpr")}
        out["tpr_at_fpr1e-6"] = self.tpr_at_fpr  # the summary's historical column name
        out["attack_kind"] = attack_kind(self.attack)  # summaries group plug-ins without importing them
        return out


# -- the steps of a point -------------------------------------------------------------------------
def _user_seed(seed: int, index: int) -> int:
    return int(np.random.default_rng([int(seed), 1, index]).integers(0, 2**62))


def draw_users(model: FingerprintModel, point: Point, settings: PointSettings, seed: int) -> Users:
    """Random codes for the colluders (screened, :func:`screened_codes`) and the innocents
    (``seed``) and the colluders' copies."""
    k = model.fingerprint_bits
    rng = np.random.default_rng([int(seed), 0])
    codes = rng.integers(0, 2, size=(point.colluders + settings.n_innocents, k), dtype=np.uint8)
    screened, rate = (screened_codes(model, point.colluders, seed, settings.screen_by) if settings.screen_codes
                       else None) or ([], None)
    if screened:
        codes[: point.colluders] = [user.code for user in screened]
    user_ids = [f"colluder{i}" for i in range(point.colluders)] + [f"innocent{i}" for i in range(settings.n_innocents)]
    start = time.perf_counter()
    copies = [
        personal_tensors(
            model, codes[i], point.act, _user_seed(seed, i) if point.act != "none" else None,
            settings.scale_range, settings.act_scope,
        )
        for i in range(point.colluders)
    ]
    seconds = (time.perf_counter() - start + sum(user.seconds for user in screened)) / point.colluders
    return Users(codes, user_ids, CodeIndex.from_bits(user_ids, codes), copies, seconds, rate)


def held_out_images(resolution: int, n_images: int, images: torch.Tensor | None = None) -> torch.Tensor:
    """``images[:n_images]`` (checked against the model's resolution) or, when None, ``n_images``
    procedural images no training run has seen."""
    if images is None:
        stream = ProceduralImages(resolution, SWEEP_IMAGE_SEED, n_images)
        return torch.stack([stream.sample(i)["image"] for i in range(n_images)])
    real = images[:n_images].float()
    if real.dim() != 4 or tuple(real.shape[1:]) != (3, resolution, resolution) or len(real) < 2:
        raise ConfigError(
            f"sweep images must be [n>=2, 3, {resolution}, {resolution}] (the model's resolution), "
            f"got {tuple(real.shape)}"
        )
    return real


def _model_attack(attack: str, strength, state, bias_map, site, generator):
    """A state-dict attack on the copy's tensors and its bias map together (the user holds both)."""
    key = f"{site}.bias_map"
    tensors = {**state, key: bias_map} if bias_map is not None else dict(state)
    out = model_attacks.STATE_ATTACKS[attack](tensors, None if strength is None else float(strength), generator)
    if attack not in BUILTIN_ATTACKS:
        out = checked_state_output(attack, out, tensors)
    return out, (out.pop(key) if bias_map is not None else None)


def attacked_decoder(model: FingerprintModel, users: Users, point: Point, generator: torch.Generator,
                     settings: PointSettings, tune_images: torch.Tensor | None = None):
    """The decoder the attacker ends up with: the first copy, the colluders' merge, or a copy after
    a model attack (noise, pruning, quantization, fine-tuning on the attacker's own images)."""
    state, bias_map, site = users.copies[0]
    config = model.vae.config
    if point.attack in MERGES:
        # The bias map is one more tensor of each copy: merged with the rest (and aligned by the
        # adaptive colluder, since stream ACT permutes its channels with the last segment).
        key = f"{site}.bias_map"
        copies = [{**s, key: b} if b is not None else s for s, b, _ in users.copies]
        merged = merge_copies(point.attack, copies, generator, num_groups=int(config.norm_num_groups))
        if point.attack not in BUILTIN_ATTACKS:
            merged = checked_state_output(point.attack, merged, copies[0])
        bias_map = merged.pop(key, None)
        state = merged
    elif point.attack in model_attacks.STATE_ATTACKS:  # noise, pruning, quantization, plug-ins
        state, bias_map = _model_attack(point.attack, point.attack_strength, state, bias_map, site, generator)
    decoder = decoder_from_tensors(config, state, bias_map, site)
    if point.attack == "finetune":
        decoder.to(settings.device)
        with torch.enable_grad():
            decoder = model_attacks.finetune_reconstruction(
                decoder, int(point.attack_strength), settings.finetune_lr, attacker_images(model, tune_images),
                batch_size=16, generator=generator,
            )
    return decoder


def attacker_images(model: FingerprintModel, images: torch.Tensor | None = None) -> torch.Tensor:
    """The attacker's own unmarked images: ``images``, or 256 procedural ones no other set uses."""
    if images is not None:
        return images
    stream = ProceduralImages(int(model.meta.get("resolution", 32)), FINETUNE_IMAGE_SEED, 256)
    return torch.stack([stream.sample(i)["image"] for i in range(256)])


@torch.no_grad()
def attacked_images(model: FingerprintModel, users: Users, point: Point, real: torch.Tensor,
                    generator: torch.Generator, settings: PointSettings,
                    tune_images: torch.Tensor | None = None) -> PointImages:
    """Decode ``real``'s latents with the base decoder and the attacked one, then apply the point's
    image or output attack."""
    device = settings.device
    latents = batched.encode(model.vae, real, device)
    base_vae = model.unmarked_vae  # what fidelity is measured against
    base_outputs = batched.decode(decoder_from_tensors(base_vae.config, base_vae.state_dict(), None, None),
                                  latents, device)
    if point.attack in IMAGE_MERGES:  # every colluder decodes the same content with their own copy
        copies = [batched.decode(decoder_from_tensors(model.vae.config, *copy), latents, device)
                  for copy in users.copies]
        outputs = IMAGE_MERGES[point.attack](copies, generator)
        if point.attack not in BUILTIN_ATTACKS:
            check_image_merge_output(point.attack, outputs, copies[0])
    else:
        outputs = batched.decode(attacked_decoder(model, users, point, generator, settings, tune_images),
                                 latents, device)
    reference = base_outputs
    if point.attack in IMAGE_ATTACKS:
        attack, draws = IMAGE_ATTACKS[point.attack], generator.get_state()
        attacked = attack(outputs, point.attack_strength, generator)
        if attacked.shape != outputs.shape:  # a cut without resize (crop, shift): fidelity against the same cut
            replay = torch.Generator()  # the attack's own random draws, replayed on the base outputs
            replay.set_state(draws)
            reference = attack(base_outputs, point.attack_strength, replay)
        outputs = attacked
    elif point.attack == "estimate_remove":
        tile = int(getattr(model.pnm, "tile_size", model.meta.get("pnm", {}).get("tile_size", 16)))
        outputs = model_attacks.estimate_and_remove(outputs, period=tile)
    elif point.attack == "spectral_remove":
        strength = 1.0 if point.attack_strength is None else float(point.attack_strength)
        outputs = model_attacks.spectral_equalize(outputs, attacker_images(model, tune_images), strength)
    return PointImages(real, base_outputs, outputs, reference)


@torch.no_grad()
def score(model: FingerprintModel, users: Users, point: Point, images: PointImages,
          settings: PointSettings, fid_net=None) -> PointResult:
    """Bits, attribution and tracing (the distributor's), detection and quality of ``images``."""
    k = model.fingerprint_bits
    logits = batched.extract(model.reader, images.outputs, settings.device).double().numpy()
    hard = (logits > 0).astype(np.uint8)
    per_colluder = [(hard == users.codes[i][None]).mean() for i in range(point.colluders)]
    names = [f"image{i}" for i in range(len(logits))]
    weights = whitened_weights(model.reader, logits, settings.decoding)  # None unless decoding=soft_whitened
    null = code_null(model.reader, settings.decoding)  # None unless decoding=soft_code_null
    rate = users.screen_pass_rate or 1.0  # the distributor's test of a screened registry (distributor/attribution.py)
    attributed = attribute_logits(logits, users.index, names, fpr=settings.fpr * rate, decoding=settings.decoding,
                                  weights=weights, null=null)["images"]
    caught, innocents = _traced(logits, weights, null, users, names, settings, point.colluders, "evidence")
    tardos_caught, tardos_innocents = _traced(logits, weights, null, users, names, settings, point.colluders, "tardos")
    colluders = users.colluder_ids
    base_logits = batched.extract_repeated(model.reader, images.base_outputs, settings.device).double().numpy()
    if weights is not None:  # the one-code test reads what attribution reads
        logits, base_logits = weights, whitened_weights(model.reader, base_logits, settings.decoding)
    fid_proxy = fid_proxy_base = None
    if fid_net is not None and images.outputs.shape[-2:] == images.real.shape[-2:]:  # no proxy across sizes
        fid_proxy = frechet_distance_proxy(images.outputs, images.real, fid_net)
        fid_proxy_base = frechet_distance_proxy(images.base_outputs, images.real, fid_net)
    return PointResult(
        method=model.method,
        fingerprint_bits=k,
        act=point.act,
        act_scope=settings.act_scope,
        attack=point.attack,
        attack_strength=None if point.attack_strength is None else float(point.attack_strength),
        colluders=point.colluders,
        n_images=len(images.real),
        registry_size=len(users.index),
        bit_acc=float(np.mean(per_colluder)),
        bit_acc_min=float(np.min(per_colluder)),
        bit_acc_max=float(np.max(per_colluder)),
        attribution_acc=float(np.mean([r["accused"] and r["user_id"] in colluders for r in attributed])),
        tpr_at_fpr=float(np.mean(code_p_values(logits, users.codes[0], settings.decoding, null)
                                 <= settings.fpr * rate)),
        false_positives=float(np.mean(code_p_values(base_logits, users.codes[0], settings.decoding, null)
                                      <= settings.fpr * rate)),
        tracing_caught=caught,
        tracing_innocents_accused=innocents,
        tardos_caught=tardos_caught,
        tardos_innocents_accused=tardos_innocents,
        psnr=float(psnr(images.outputs, images.reference).mean()),
        ssim=float(ssim(images.outputs, images.reference)),
        fid_proxy=fid_proxy,
        fid_proxy_base=fid_proxy_base,
        issue_seconds=users.issue_seconds,
        screen_pass_rate=users.screen_pass_rate,
        images=images,
        users=users,
    )


def _traced(logits: np.ndarray, weights: np.ndarray | None, null, users: Users, names: list[str],
            settings: PointSettings, top: int, scoring: str) -> tuple[int, int]:
    """(colluders, innocents) the distributor's tracing accuses with ``scoring``."""
    suspects = trace_logits(logits, users.index, names, fpr=settings.tracing_fpr * (users.screen_pass_rate or 1.0),
                            top=top, scoring=scoring,
                            decoding=settings.decoding, weights=weights, null=null)["suspects"]
    accused = [s["user_id"] for s in suspects if s["accused"]]
    colluders = users.colluder_ids
    return sum(u in colluders for u in accused), sum(u not in colluders for u in accused)


def evaluate_point(model: FingerprintModel, point: Point, settings: PointSettings, seed: int, fid_net=None,
                   images: torch.Tensor | None = None, tune_images: torch.Tensor | None = None) -> PointResult:
    """Draw the users, attack, decode and score one point (``seed``: codes, ACT seeds, attack
    randomness). ``images``: held-out real images ``[n, 3, R, R]`` in [-1, 1] (None: procedural);
    ``tune_images``: the fine-tuning attacker's own images (None: 256 other procedural images);
    ``fid_net``: the fid_proxy feature net (None skips ``fid_proxy``). The result keeps the images
    it scored (``result.images``) and the users it drew (``result.users``)."""
    start = time.perf_counter()
    real = held_out_images(int(model.meta.get("resolution", 32)), settings.n_images, images)
    users = draw_users(model, point, settings, seed)
    generator = torch.Generator().manual_seed(int(seed))
    point_images = attacked_images(model, users, point, real, generator, settings, tune_images)
    result = score(model, users, point, point_images, settings, fid_net)
    result.seconds = time.perf_counter() - start
    return result
