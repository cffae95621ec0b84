"""The method interface, and the code -> copy tensors step every PNM-family method shares."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar

import numpy as np
import torch

from fingerprint_lm.errors import ConfigError, check_float, check_int, check_keys, keyword_names, settings_from
from fingerprint_lm.lit.training_settings import TrainingSettings
from fingerprint_lm.methods.content_reader import check_content_reader_settings
from fingerprint_lm.models.act import ACT_TYPES, apply_act, draw_act
from fingerprint_lm.models.augment import AugmentConfig
from fingerprint_lm.models.checkpoint import FingerprintModel, build_fingerprint_model
from fingerprint_lm.models.pnm import PersonalizedDecoder, check_decoder_settings

# what a later training cycle's fingerprint loss may read (FingerprintMethod.second_cycle's read_with)
CYCLE_READERS = ("extractor", "content_reader")


@dataclass
class FingerprintMethod:
    """One fingerprinting method, built from ``conf/method/<name>.yaml`` (plain values only).

    Parameters:
        name: the method's name, recorded in every checkpoint it trains.
        steps: training steps of the fingerprint stage.
        pnm: keyword arguments of :class:`~fingerprint_lm.models.pnm.PersonalizedDecoder`.
        extractor: keyword arguments of the extractor (``kind`` picks its class:
            :func:`~fingerprint_lm.models.extractor.build_extractor`).
        train: fields of :class:`~fingerprint_lm.lit.training_settings.TrainingSettings`, the keyword
            arguments of :class:`~fingerprint_lm.lit.fingerprinting.FingerprintModule`.
        augment: fields of :class:`~fingerprint_lm.models.augment.AugmentConfig`.
        detector_fit_samples: images for a closed-form start of the extractor (0: none).
        checkpoint_name: the folder under ``fingerprint_lm/assets/`` its shipped checkpoint lives in.
        shipped_steps: the steps its shipped checkpoint was trained with (``+experiment=train``
            and the collusion sweep train that many, so that the sweep can use the shipped one).
        second_cycle: ``{steps, train[, read_with]}``: after the ``steps``, the trained model trains
            on for a second cycle of the rates, ``train`` overriding keys of ``train`` (what
            ``init_from`` does, in the same run: :meth:`later_cycles`); a list of such mappings: one
            cycle after another; None: one cycle. ``read_with``: the reader the cycle's fingerprint
            loss reads, ``extractor`` (the default: the reader training shapes) or ``content_reader``
            (pnm's content reader, fitted to the model before the cycle and kept fixed through it).
        shipped_second_cycle: the second cycle its shipped checkpoint was trained with (None: one);
            ``+experiment=train`` and the collusion sweep set ``second_cycle`` to it.
        issue_screen: ``{keep, min_psnr[, candidates, probe_images, rate_candidates]}``: after training, the
            training task fits the floors ``task=issue`` screens codes with
            (``distributor/screening.py: fit_floors``) and records them in the checkpoint; None:
            its copies are issued unscreened.
        content_reader: ``{train_images, unmarked_images, calibration_images, steps, seed}``: last
            of all, the distributor's content-dividing reader is fitted to the trained model
            (``methods/content_reader.py``; it reads a band-energy reader's filters); None: none,
            found images are read with the extractor.
    """

    name: str
    steps: int
    pnm: dict[str, Any] = field(default_factory=dict)
    extractor: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    augment: dict[str, Any] = field(default_factory=dict)
    detector_fit_samples: int = 0
    checkpoint_name: str = "embedded"
    shipped_steps: int | None = None
    second_cycle: dict[str, Any] | list[dict[str, Any]] | None = None
    shipped_second_cycle: dict[str, Any] | list[dict[str, Any]] | None = None
    issue_screen: dict[str, Any] | None = None
    content_reader: dict[str, Any] | None = None

    # False: nothing is shared across users to train (stable_signature trains each copy instead);
    # the training stage then runs only the method's hooks.
    trains_shared_modules: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check_int("method.steps", self.steps, 1 if self.trains_shared_modules else 0)
        check_int("method.detector_fit_samples", self.detector_fit_samples, 0)
        # Every setting is checked here, when Hydra builds the method: a misspelt key or a value out
        # of range is one error line before any training starts. The dictionaries themselves stay
        # what the checkpoint records (the shipped ones are matched on them key for key).
        settings_from(check_decoder_settings, self.pnm, "method.pnm",
                      known=keyword_names(PersonalizedDecoder, ("decoder", "fingerprint_bits", "post_quant_conv")))
        settings_from(AugmentConfig, self.augment, "method.augment")
        if self.trains_shared_modules:
            settings_from(TrainingSettings, self.train, "method.train")
        # shipped_second_cycle is what the shipped checkpoint was trained with: it runs only when a
        # recipe copies it into second_cycle (a debug run drops the content reader and keeps it)
        for where, runs in (("second_cycle", True), ("shipped_second_cycle", False)):
            self._check_cycle(where, getattr(self, where), runs)
        self._check_issue_screen()
        self._check_content_reader()

    def _check_content_reader(self) -> None:
        if self.content_reader is None:
            return
        if not isinstance(self.content_reader, dict):
            raise ConfigError(f"method.content_reader must be a mapping {{train_images, ...}} or null, "
                              f"got {self.content_reader!r}")
        self.content_reader = check_content_reader_settings(self.content_reader)
        if self.extractor.get("kind") != "band_energy":
            raise ConfigError("method.content_reader reads the band reader's filters: it needs "
                              "method.extractor.kind=band_energy (or method.content_reader=null)")

    def _check_issue_screen(self) -> None:
        screen = self.issue_screen
        if screen is None:
            return
        if not isinstance(screen, dict):
            raise ConfigError(f"method.issue_screen must be a mapping {{keep, min_psnr}} or null, got {screen!r}")
        check_keys("method.issue_screen", screen, ("keep", "min_psnr", "candidates", "probe_images", "rate_candidates"))
        check_float("method.issue_screen.keep", screen.get("keep"), above=0.0, maximum=1.0)
        check_float("method.issue_screen.min_psnr", screen.get("min_psnr"), above=0.0)
        for key in ("candidates", "probe_images", "rate_candidates"):
            if key in screen:
                check_int(f"method.issue_screen.{key}", screen[key])

    def _check_cycle(self, where: str, cycle: dict[str, Any] | list | None, runs: bool) -> None:
        if cycle is None:
            return
        if not self.trains_shared_modules:
            raise ConfigError(f"method.{where}: {self.name} trains nothing shared, so it has no second cycle")
        if isinstance(cycle, list) and not cycle:
            raise ConfigError(f"method.{where} is an empty list: null for no second cycle")
        for number, one in enumerate(cycle if isinstance(cycle, list) else [cycle]):
            name = f"method.{where}[{number}]" if isinstance(cycle, list) else f"method.{where}"
            if not isinstance(one, dict):
                raise ConfigError(f"{name} must be a mapping {{steps: N, train: {{...}}}} (or a list of them) "
                                  f"or null, got {one!r}")
            check_keys(name, one, ("steps", "train", "read_with"))
            check_int(f"{name}.steps", one.get("steps"), 1)
            settings_from(TrainingSettings, {**self.train, **(one.get("train") or {})}, f"{name}.train")
            read_with = one.get("read_with", "extractor")
            if read_with not in CYCLE_READERS:
                raise ConfigError(f"{name}.read_with must be one of {', '.join(CYCLE_READERS)}, got {read_with!r}")
            if runs and read_with == "content_reader" and self.content_reader is None:
                raise ConfigError(f"{name}.read_with=content_reader needs method.content_reader (pnm's settings)")

    def later_cycles(self) -> list[tuple[FingerprintMethod, str]]:
        """The cycles after the first (``second_cycle``), in order: for each, the method it trains
        with (its ``steps``, its ``train`` keys over this method's) and the reader its loss reads
        (``read_with``); empty without a second cycle."""
        if self.second_cycle is None:
            return []
        cycles = self.second_cycle if isinstance(self.second_cycle, list) else [self.second_cycle]
        return [(replace(self, steps=int(cycle["steps"]), train={**self.train, **(cycle.get("train") or {})},
                         second_cycle=None), cycle.get("read_with", "extractor")) for cycle in cycles]

    # -- what a checkpoint records --------------------------------------------------------------
    def record(self) -> dict[str, Any]:
        """The part of ``fingerprint.json`` that rebuilds this method's modules."""
        return {"method": self.name, "pnm": dict(self.pnm), "extractor": dict(self.extractor)}

    def build_model(self, vae, fingerprint_bits: int) -> FingerprintModel:
        return build_fingerprint_model(vae, fingerprint_bits, self.pnm, self.extractor, self.record())

    # -- the training stage's hooks (stages.train_fingerprint) ---------------------------------
    def before_fit(self, module, loader: Iterable) -> dict[str, Any]:
        """Runs once before a fresh (not resumed) training, with ``module`` on the training
        device; ``loader`` yields training batches. Returns facts for ``metrics.json``."""
        return {}

    def prepare_training(self, module, loader: Iterable) -> None:
        """Runs before every training, fresh or resumed (after :meth:`before_fit` on a fresh one),
        with ``module`` on the training device: state the module needs but does not checkpoint."""

    def after_fit(self, module, loader: Iterable) -> dict[str, Any]:
        """Runs after training (fresh or resumed), with ``module`` on the training device."""
        return {}


def image_batches(loader: Iterable, n: int) -> Iterator[torch.Tensor]:
    """The first ``n`` images of a loader, batch by batch (the last batch cut to fit), without
    holding them all at once."""
    count = 0
    for batch in loader:
        images = batch["image"][: n - count]
        count += len(images)
        yield images
        if count >= n:
            return


def collect_images(loader: Iterable, n: int) -> torch.Tensor:
    """The first ``n`` images of a loader, stacked."""
    return torch.cat(list(image_batches(loader, n)))


# Methods whose copies are trained one per user register here how (method name ->
# ``(model, code) -> VAE state dict``): methods.stable_signature.
COPY_TRAINERS: dict[str, Callable[[FingerprintModel, np.ndarray], dict[str, torch.Tensor]]] = {}


@torch.no_grad()
def personal_tensors(
    model: FingerprintModel,
    bits,
    act_type: str = "none",
    act_seed: int | None = None,
    scale_range: tuple[float, float] = (0.25, 4.0),
    act_scope: str = "stream",
    modulation_gain: float = 1.0,
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None, str | None]:
    """The tensors of one user's copy: ``(vae_state_dict, bias_map, bias_map_site)``.

    ``modulation_gain`` multiplies every modulation value of the code (each a change from the
    shared decoder; 1 is what training made; ignored by methods that train each copy): an
    experiment's knob. It cannot set a pnm copy's PSNR: every code's PSNR peaks at gain 1
    (``experiments/copy_gain.py``).

    Affine sites: ``weight = gamma_0 * (1 + scale)``, ``bias = beta_0 + shift`` (float64, one
    rounding), the function :class:`~fingerprint_lm.models.modulated.ModulatedGroupNorm` computes;
    conv sites: input-channel columns of the weight times ``1 + in_scale``, plus the per-user
    kernel ``weight_delta`` at kernel sites, one rounding too
    (:class:`~fingerprint_lm.models.modulated.ModulatedConv2d`); a method in :data:`COPY_TRAINERS`
    trains the copy's weights instead. Then
    the user's ACT (``act_seed`` required unless ``act_type == "none"``) over ``act_scope``
    (:data:`~fingerprint_lm.models.act.ACT_SCOPES`; stream ACT permutes the bias map's channels
    with the last stream segment). ``bias_map`` is the spatial site's ``[1, C, T, T]`` map (None
    without a spatial site: ``method=pnm``), ``bias_map_site`` its module name in the VAE
    (``decoder.conv_norm_out``). Every returned tensor is a fresh copy.
    """
    code = torch.as_tensor(np.asarray(bits)).long().reshape(1, -1)
    bias_map, site_name = None, None
    if model.method in COPY_TRAINERS:
        state = COPY_TRAINERS[model.method](model, code[0].numpy())
        modulation = {}
    else:
        modulation = model.pnm.modulation(code)  # checks the code length against the model
        if modulation_gain != 1.0:
            modulation = {site: {name: value * float(modulation_gain) for name, value in values.items()}
                          for site, values in modulation.items()}
        base = model.vae.state_dict()
        state = dict(base)
    for site, values in modulation.items():
        prefix = f"decoder.{site}"
        if "scale" in values:
            weight, bias = base[f"{prefix}.weight"], base[f"{prefix}.bias"]
            state[f"{prefix}.weight"] = (weight.double() * (1.0 + values["scale"][0].double())).to(weight.dtype)
            state[f"{prefix}.bias"] = (bias.double() + values["shift"][0].double()).to(bias.dtype)
        if "in_scale" in values or "weight_delta" in values:
            # conv((1 + s) * x) == the conv with weight[:, c] * (1 + s_c); the per-user kernel is
            # added after the scales, as ModulatedConv2d does
            weight = base[f"{prefix}.weight"]
            modulated = weight.double()
            if "in_scale" in values:
                modulated = modulated * (1.0 + values["in_scale"][0].double())[None, :, None, None]
            if "weight_delta" in values:
                modulated = modulated + values["weight_delta"][0].double()
            state[f"{prefix}.weight"] = modulated.to(weight.dtype)
        if "bias_map" in values:
            bias_map, site_name = values["bias_map"].detach().clone().contiguous(), prefix
    if act_type not in ACT_TYPES:
        raise ConfigError(f"unknown ACT type {act_type!r}; expected one of {', '.join(ACT_TYPES)}")
    params = {}
    if act_type != "none":
        if act_seed is None:
            raise ConfigError(f"ACT type {act_type!r} needs a seed (derive_act_seed(secret, user_id))")
        params = draw_act(state, act_type, int(model.vae.config.norm_num_groups), act_seed, scale_range, act_scope)
    if bias_map is None:
        return apply_act(state, params), None, None
    # The bias map rides in the state dict through ACT (a stream segment ends at its GroupNorm).
    key = f"{site_name}.bias_map"
    transformed = apply_act({**state, key: bias_map}, params)
    return transformed, transformed.pop(key), site_name
