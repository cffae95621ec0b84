"""What ``method.train`` may hold: the fingerprint training stage's settings, typed and
range-checked in one place.

:class:`~fingerprint_lm.lit.fingerprinting.FingerprintModule` takes them as keyword arguments
(tests and experiments pass a few) and builds this dataclass from them; a method checks its whole
``train`` dictionary against it when Hydra instantiates the method, so a misspelt key or a negative
rate is one ``error:`` line before a base VAE is pretrained or an image decoded. A checkpoint
records ``method.train`` as written, not this dataclass's full field set, so the shipped
checkpoints' records (which the sweep matches key for key) stay what they were.
"""

from __future__ import annotations

from dataclasses import dataclass

from fingerprint_lm.errors import ConfigError, check_choice, check_float, check_int

WC_ASCENTS: tuple[str, ...] = ("exact", "reuse", "lagged")
WARMDOWN_READERS: tuple[str, ...] = ("trained", "frozen")


@dataclass(frozen=True)
class TrainingSettings:
    """The settings of :class:`~fingerprint_lm.lit.fingerprinting.FingerprintModule`.

    Parameters:
        lr: AdamW learning rate of the PNM and extractor.
        lambda_fp: weight of the clean fingerprint BCE.
        lambda_wc: weight of the worst-case fingerprint BCE (ignored when ``wc_steps`` = 0).
        wc_steps: K, inner ascent steps (0 = plain training).
        wc_rho: relative radius of the weight perturbation per tensor.
        wc_rho_ramp: the radius grows linearly from 0 to ``wc_rho`` over this many steps (0: none),
            counted from step 0, not from ``wc_start``.
        wc_ascent: where the first ascent direction comes from: ``exact`` (the clean fingerprint
            BCE's gradient: one more backward over the clean graph), ``reuse`` (the whole clean
            loss's gradient, which the clean backward computes anyway: SAM's choice) or ``lagged``
            (the previous step's worst-case gradient; the clean backward then skips the decoder
            weights' gradients). ``experiments/worst_case_cost.py`` compares them.
        wc_every: the worst-case term is added on every ``wc_every``-th step (1: every step).
        wc_start: first step with the worst-case term (turned on late, at step 3000, it wiped
            the mark learned without it: experiments/results/worst_case_start.md).
        psnr_target: fidelity the reconstruction weight steers to (dB, fingerprinted vs base).
        rec_weight_init: initial reconstruction weight.
        rec_weight_lr: step of the dual update on log(rec weight).
        train_decoder: also train the decoder's own weights (lower lr), so the mark can move into
            the main path; a frozen copy of the decoder as it was (``reference_pnm``) stays the
            reconstruction target and the PSNR reference, so fidelity is measured against the
            decoder a user would otherwise get (at twice the decoder's memory).
        decoder_lr: learning rate of the decoder's weights when ``train_decoder``.
        carrier_dropout: probability that a training batch is decoded without the carrier bias
            maps, so the main-path affine sites must carry the fingerprint on their own.
        rewhiten_every: re-fit the whitening on the unmarked outputs a method hook sets every this
            many steps; 0: never (slowed learning: experiments/results/whitening_table.md).
        lr_warmdown_fraction: every learning rate falls linearly to 0 over this fraction of the
            run's last steps (0: constant); ``warmdown_reader`` ``frozen``: the reader is re-whitened
            then and trains no more (:mod:`fingerprint_lm.lit.warmdown`).
        whiteness_weight, whiteness_batch: a penalty keeping a learned reader white on
            ``whiteness_batch`` unmarked outputs a step (:mod:`fingerprint_lm.lit.whiteness`; 0:
            off). The batch must exceed the code length, which the module checks.
    """

    lr: float = 1e-3
    lambda_fp: float = 1.0
    lambda_wc: float = 1.0
    wc_steps: int = 1
    wc_rho: float = 0.01
    wc_rho_ramp: int = 0
    wc_ascent: str = "exact"
    wc_every: int = 1
    wc_start: int = 0
    psnr_target: float = 31.0
    rec_weight_init: float = 100.0
    rec_weight_lr: float = 0.01
    train_decoder: bool = False
    decoder_lr: float = 1e-5
    carrier_dropout: float = 0.0
    rewhiten_every: int = 0
    lr_warmdown_fraction: float = 0.0
    warmdown_reader: str = "trained"
    whiteness_weight: float = 0.0
    whiteness_batch: int = 128

    def __post_init__(self) -> None:
        for name in ("lr", "decoder_lr", "psnr_target", "rec_weight_init"):
            check_float(name, getattr(self, name), above=0.0)
        for name in ("lambda_fp", "lambda_wc", "wc_rho", "rec_weight_lr", "whiteness_weight"):
            check_float(name, getattr(self, name), minimum=0.0)
        for name in ("carrier_dropout", "lr_warmdown_fraction"):
            check_float(name, getattr(self, name), minimum=0.0, maximum=1.0)
        for name in ("wc_steps", "wc_rho_ramp", "wc_start", "rewhiten_every"):
            check_int(name, getattr(self, name), minimum=0)
        check_int("wc_every", self.wc_every)
        check_int("whiteness_batch", self.whiteness_batch, minimum=2)
        check_choice("wc_ascent", self.wc_ascent, WC_ASCENTS)
        check_choice("warmdown_reader", self.warmdown_reader, WARMDOWN_READERS)
        if not isinstance(self.train_decoder, bool):
            raise ConfigError(f"train_decoder must be true or false, got {self.train_decoder!r}")
