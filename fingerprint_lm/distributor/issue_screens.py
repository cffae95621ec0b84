"""Which screen draws a pnm copy's code: one rule for ``task=issue`` and the collusion sweep.

Two screens keep a code. The probe screen (:mod:`~fingerprint_lm.distributor.screening`) decodes
64 probe images per draw and keeps the code whose read clears the checkpoint's floors. The
predicted screen (:mod:`~fingerprint_lm.distributor.read_predictor`) predicts that read from the
code and decodes nothing. ``screen_by=auto``, the default, takes the predicted screen where the
checkpoint records a read predictor and no probe floor is overridden, and the probe screen
otherwise (a checkpoint trained with ``eval.issue_predictor_codes: 0``, as ``+experiment=smoke``
trains). Why the predictor wins where there is one: its copies attribute as
the probe screen's do, within noise (0.9909 against 0.9899 on average over five registries of 32
copies, ``experiments/results/default_condition.md``), and at SD's decoder size a probe-screened copy
costs about 2400 s of CPU against 0.29 s since the screen keeps the best 10% of codes (about 12 draws;
an estimate, ``BENCHMARKS.md`` of 2026-12-08). What it gives up: the probe screen
checks each copy's PSNR, the predictor predicts it (copies down to 29.6 dB pass against 29.9).

The sweep draws its colluders' codes with the same rule (:func:`screened_codes`), so its figures
are those of copies ``task=issue`` would issue.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from fingerprint_lm.distributor.read_predictor import PredictedScreen, recorded_predictor
from fingerprint_lm.distributor.screening import CodeScreen, bound_pass_rate, screen_floors
from fingerprint_lm.errors import ConfigError, RegistryError, check_int
from fingerprint_lm.models.checkpoint import FingerprintModel
from fingerprint_lm.storage import config_hash


def records_predictor(model: FingerprintModel) -> bool:
    """Whether the checkpoint records a read predictor (weights and thresholds)."""
    return bool(((model.meta.get("issue_screen") or {}).get("predictor")) and model.issue_predictor)


def choose_screen(model: FingerprintModel, screen_by: str = "auto", screen_codes: bool = True,
                  floors_overridden: bool = False) -> str | None:
    """``"predicted"``, ``"probe"`` or None (codes issued as drawn) for ``model``'s copies.

    ``screen_by``: ``auto`` (the predictor if the checkpoint records one and no probe floor is
    overridden, else the probe), ``probe`` or ``predicted``. A predicted screen the checkpoint cannot
    give, or one asked for beside probe floors, is a ConfigError, raised before anything is written.
    None when ``screen_codes`` is false or the probe screen has no floor to keep."""
    if not screen_codes:
        return None
    if screen_by == "predicted" and floors_overridden:
        raise ConfigError("distributor.min_probe_bit_acc / min_probe_psnr set the probe screen's floors; "
                          "distributor.screen_by=predicted keeps the predictor's thresholds")
    if screen_by == "predicted" or (screen_by == "auto" and not floors_overridden and records_predictor(model)):
        recorded_predictor(model)  # refuses a checkpoint without one, or one of the wrong shape
        return "predicted"
    recorded = model.meta.get("issue_screen") or {}
    has_floor = any(recorded.get(key) is not None for key in ("min_probe_bit_acc", "min_probe_psnr"))
    return "probe" if has_floor or floors_overridden else None


def make_screen(kind: str | None, model: FingerprintModel, registry, min_bit_acc: float | None = None,
                min_psnr: float | None = None, max_draws: int | None = None):
    """The code drawer of :func:`choose_screen`'s ``kind`` over ``registry`` (its ``new_code``), or
    None. Probe floors left None are the checkpoint's."""
    if kind is None:
        return None
    draws = {} if max_draws is None else {"max_draws": max_draws}
    if kind == "predicted":
        return PredictedScreen(*recorded_predictor(model), registry, **draws)
    recorded = model.meta.get("issue_screen") or {}
    floors = screen_floors(recorded, True, min_bit_acc, min_psnr)
    return CodeScreen(model, registry, floors[0], int(recorded.get("probe_images", 64)), min_psnr=floors[1], **draws)


def screen_report(screen) -> dict[str, Any]:
    """What ``issue.json`` says of the screen that kept the issued code: the screen, its draws,
    how the code read (probe) or is predicted to read, and the floors or thresholds it cleared."""
    if isinstance(screen, PredictedScreen):
        return {"screen_by": "predicted", "predicted_bit_acc": screen.predicted_bit_acc,
                "predicted_psnr": screen.predicted_psnr, "code_draws": screen.draws,
                "screen": {key: screen.record[key] for key in ("min_predicted_bit_acc", "min_predicted_psnr")}}
    return {"screen_by": "probe", "probe_bit_acc": screen.probe_bit_acc, "probe_psnr": screen.probe_psnr,
            "code_draws": screen.draws,
            "screen": {"min_probe_bit_acc": screen.min_bit_acc, "min_probe_psnr": screen.min_psnr}}


class UniformCodes:
    """Uniform ``bits``-bit codes for a screen where no registry draws them (the collusion sweep's
    users: no distance check against other codes)."""

    def __init__(self, bits: int) -> None:
        self.bits = check_int("bits", bits)

    def new_code(self, rng: np.random.Generator) -> np.ndarray:
        return rng.integers(0, 2, self.bits, dtype=np.uint8)


@dataclass(frozen=True)
class ScreenedCode:
    """One user's screened code, the draws it took and the wall time of the screen."""

    code: np.ndarray
    draws: int
    seconds: float


# The collusion sweep asks for the same users at every point of a process:
# (model, screen, max_draws, seed, user).
_SCREENED: dict[tuple[str, str, int | None, int, int], ScreenedCode] = {}


def _model_key(model: FingerprintModel) -> str:
    """The checkpoint's record and every weight a screen depends on (its decoders, mapping network,
    reader and read predictor): two models share screened codes only if they would screen alike."""
    digest = hashlib.sha256(config_hash(model.meta).encode())
    states = [module.state_dict() for module in (model.vae, model.unmarked_vae, model.pnm, model.extractor)]
    if model.content_reader is not None:  # its own tensors: its base VAE is unmarked_vae, above
        states.append(model.content_reader.own_state())
    for state in states:
        for name, tensor in state.items():
            digest.update(name.encode() + tensor.detach().cpu().contiguous().numpy().tobytes())
    for name, tensor in sorted((model.issue_predictor or {}).items()):
        digest.update(name.encode() + tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def screened_codes(model: FingerprintModel, users: int, seed: int, screen_by: str = "auto",
                   max_draws: int | None = None) -> tuple[list[ScreenedCode], float] | None:
    """Codes for ``users`` users of ``model`` drawn and screened as ``task=issue`` screens them
    (:func:`choose_screen`; uniform draws, no distance check; user ``i`` draws from
    ``default_rng([seed, 2, i])``, at most ``max_draws`` times, each screen's default if None), with
    the pass rate attribution divides p-values by (:func:`bound_pass_rate` of the checkpoint's rates:
    ``task=attribute`` also takes the registry's own count where smaller); None when the checkpoint
    records no screen (carrier, wouaf, stable_signature, the sweep's own models), whichever
    ``screen_by``. Memoised per process, with the wall time each screen took when it ran."""
    if not model.meta.get("issue_screen"):
        return None
    kind = choose_screen(model, screen_by)
    if kind is None:
        return None
    recorded = model.meta["issue_screen"]
    if kind == "probe" and recorded.get("pass_rate") is None:
        raise ConfigError("the checkpoint's issue_screen records floors but no pass_rate: refit it with "
                          "experiments/fit_issue_screen.py <checkpoint> --refit")
    key, screen, codes = _model_key(model), None, []
    for user in range(check_int("users", users)):
        memo = (key, kind, max_draws, int(seed), user)
        if memo not in _SCREENED:
            screen = screen or make_screen(kind, model, UniformCodes(model.fingerprint_bits), max_draws=max_draws)
            start = time.perf_counter()
            try:
                code = screen(np.random.default_rng([int(seed), 2, user]))
            except RegistryError as error:
                raise ConfigError(f"no code among {screen.max_draws} draws clears the {kind} screen the checkpoint "
                                  "records: sweep.screen_codes=false evaluates codes as drawn") from error
            _SCREENED[memo] = ScreenedCode(code, screen.draws, time.perf_counter() - start)
        codes.append(_SCREENED[memo])
    return codes, float(bound_pass_rate(1.0, recorded))
