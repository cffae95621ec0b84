"""Training the PNM and the extractor, with the worst-case (minimax) weight-perturbation term.

Loss = w_rec * MSE(decoded_u, decoded_base) + lambda_fp * BCE(E(aug(decoded_u)), f_u)
       + lambda_wc * BCE(E(aug(decoded_u; theta + delta*)), f_u)

``delta*`` comes from K steps of normalised gradient ascent on the fingerprint loss, per decoder
tensor, inside ``||delta_t|| <= rho * ||theta_t||`` (AWP/SAM style). Where the first ascent
direction comes from is ``wc_ascent`` (``FingerprintModule``); the shipped ``lagged`` takes the
previous step's worst-case gradient, so a K = 1 step costs one more forward and backward than a
plain step (1.8x measured, ``make bench``) instead of 2.6x for the exact direction.
``w_rec`` follows a PSNR target (dual ascent on log w_rec) so runs land at the fidelity asked for.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterator
from dataclasses import asdict

import lightning as L
import torch
from diffusers import AutoencoderKL
from torch import nn
from torch.nn import functional as F

from fingerprint_lm.errors import ConfigError, check_int, settings_from
from fingerprint_lm.lit import warmdown, whiteness
from fingerprint_lm.lit.training_settings import TrainingSettings
from fingerprint_lm.lit.worst_case import set_perturbed, worst_case_perturbation
from fingerprint_lm.metrics.quality import psnr, ssim
from fingerprint_lm.models.augment import AugmentConfig, random_augment
from fingerprint_lm.models.extractor import FingerprintExtractor
from fingerprint_lm.models.pnm import PersonalizedDecoder
from fingerprint_lm.models.vae import encode_latents, encoder_parameters, freeze_encoder


class FingerprintModule(L.LightningModule):
    """Trains the PNM (mapping, heads, carriers) and the extractor; the base VAE is frozen.

    Parameters:
        vae: the base ``AutoencoderKL`` (its decoder is wrapped by ``pnm``; encoder used for latents).
        pnm: the personalised decoder wrapping ``vae.decoder``.
        extractor: image -> k logits.
        augment: training augmentations.
        calibration_batch_size: images per decoder pass when calibrating the carriers and fitting
            the detector before training (decoder activations at SD scale bound it, not the data).
        reference_vae: with ``train_decoder``, the base VAE as it was when it differs from ``pnm``'s
            decoder now (a model continued with ``init_from``): its decoder weights are the
            fidelity reference; None: ``pnm``'s decoder as it is at construction.
        **training: :class:`~fingerprint_lm.lit.training_settings.TrainingSettings` (``method.train``),
            each one readable as an attribute of the module (``self.lr``, ``self.wc_rho``, ...).

    The encoder is never trained here: latents come from it under ``no_grad`` and no optimizer
    group holds its parameters (checked in ``configure_optimizers``). Mixed precision comes from
    the Trainer (``precision=bf16-mixed``): the decoder runs under autocast, every loss and the
    PSNR steering are computed in float32, and weight perturbations are made in float32 and
    applied in each parameter's own dtype.
    """

    def __init__(
        self,
        vae: AutoencoderKL,
        pnm: PersonalizedDecoder,
        extractor: FingerprintExtractor,
        augment: AugmentConfig | None = None,
        calibration_batch_size: int = 256,
        reference_vae: AutoencoderKL | None = None,
        **training,
    ):
        super().__init__()
        self.automatic_optimization = False
        self.vae = vae
        self.pnm = pnm
        self.extractor = extractor
        self.augment = augment or AugmentConfig()
        self.calibration_batch_size = check_int("calibration_batch_size", calibration_batch_size)
        settings = settings_from(TrainingSettings, training, "FingerprintModule")
        for name, value in asdict(settings).items():  # the step code reads self.lr, self.wc_rho, ...
            setattr(self, name, value)
        # with the penalty on, a batch no larger than the code could not have the identity as covariance
        if self.whiteness_weight > 0 and self.whiteness_batch <= pnm.fingerprint_bits:
            raise ConfigError(f"whiteness_batch must exceed the {pnm.fingerprint_bits} logits, "
                              f"got {self.whiteness_batch}")
        self.whitening_outputs: torch.Tensor | None = None  # set by the method (PNMMethod.prepare_training)
        self.history: list[dict] = []  # per-step training curve (written beside metrics.json)
        self.register_buffer("log_rec_weight", torch.tensor(math.log(self.rec_weight_init)))
        self.register_buffer("detector_fitted", torch.tensor(False))
        self.vae.requires_grad_(False)
        freeze_encoder(self.vae)
        # Before any decoder weight can move: what fidelity is measured against (see reference()).
        self.reference_pnm = copy.deepcopy(pnm).requires_grad_(False).eval() if self.train_decoder else None
        if self.reference_pnm is not None and reference_vae is not None:
            self.reference_pnm.decoder.load_state_dict(reference_vae.decoder.state_dict())
            if self.reference_pnm.post_quant_conv is not None:
                self.reference_pnm.post_quant_conv.load_state_dict(reference_vae.post_quant_conv.state_dict())
        for weight in self.decoder_weights():
            weight.requires_grad_(self.train_decoder)
        for param in self.pnm.pnm_parameters():
            param.requires_grad_(True)
        self.vae.eval()

    @property
    def fingerprint_bits(self) -> int:
        return self.pnm.fingerprint_bits

    def random_bits(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randint(0, 2, (n, self.fingerprint_bits), generator=generator).to(self.device)

    @torch.no_grad()
    def reference(self, latents: torch.Tensor) -> torch.Tensor:
        """The unmarked output fidelity is measured against: the base decoder as it was before
        training (the shared decoder itself when it is not trained)."""
        decoder = self.pnm if self.reference_pnm is None else self.reference_pnm
        return decoder(latents, None)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Float32 latents from the frozen encoder (no graph is ever built through it)."""
        return encode_latents(self.vae, images)

    @torch.no_grad()
    def unmarked_chunks(self, images: torch.Tensor) -> Iterator[torch.Tensor]:
        """The reference decoder's (unmarked) float32 outputs of ``images``, made and yielded
        ``calibration_batch_size`` at a time on the module's device: what whitening fits read,
        without holding every output at once."""
        for chunk in images.split(self.calibration_batch_size):
            yield self.reference(self.encode(chunk.to(self.device))).float()

    def decoder_weights(self) -> list[nn.Parameter]:
        """The copy's weights a worst-case perturbation acts on (everything a user holds)."""
        private = {id(p) for p in self.pnm.pnm_parameters()}
        return [p for n, p in self.pnm.named_parameters() if n.startswith(("decoder.", "post_quant_conv."))
                and id(p) not in private]

    def fingerprint_loss(self, images: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
        logits = self.extractor(random_augment(images.float(), self.augment))
        return F.binary_cross_entropy_with_logits(logits.float(), bits.float())

    # -- training -----------------------------------------------------------------------------
    def on_train_start(self) -> None:
        self._train_start = time.perf_counter()
        freeze_encoder(self.vae)  # the Trainer put every submodule in train mode

    def on_train_end(self) -> None:
        # the lagged ascent's last direction is no part of the state (fit() moves the module back to
        # the CPU, not this list): device memory the size of the decoder, let go once training ends
        self._lagged_direction = None

    def on_train_epoch_start(self) -> None:
        freeze_encoder(self.vae)

    @property
    def rewhitens_in_training(self) -> bool:  # then a method hook must set whitening_outputs
        return bool(self.rewhiten_every or self.whiteness_weight
                    or (self.lr_warmdown_fraction and self.warmdown_reader == "frozen"))

    @torch.no_grad()
    def refresh_whitening(self) -> None:
        """Re-fit the whitening on ``whitening_outputs`` in float32, also under bf16 autocast."""
        with torch.autocast(self.device.type, enabled=False):
            self.extractor.fit_whitening_chunks(self.whitening_outputs.split(self.calibration_batch_size))

    def training_step(self, batch, batch_idx):
        if self.rewhiten_every and self.whitening_outputs is not None and self.global_step % self.rewhiten_every == 0:
            self.refresh_whitening()
        optimizer = self.optimizers()
        images = batch["image"]
        latents = self.encode(images)
        base = self.reference(latents)
        bits = self.random_bits(len(images))
        rec_weight = self.log_rec_weight.exp()
        carriers = not (self.carrier_dropout > 0 and float(torch.rand(())) < self.carrier_dropout)

        reader_frozen = self._warmdown(optimizer)
        optimizer.zero_grad(set_to_none=True)
        worst_case = self.wc_steps > 0 and self.global_step >= self.wc_start and self._wc_due()
        if worst_case and self._clean_pass_needs_weight_grads():
            self._weights_require_grad(self.decoder_weights(), True)
        out = self.pnm(latents, bits, carriers).float()
        base = base.float()
        rec = F.mse_loss(out, base)
        bce = self.fingerprint_loss(out, bits)
        loss = rec_weight * rec + self.lambda_fp * bce
        whiteness_term = torch.zeros((), device=self.device)
        if self.whiteness_weight and self.whitening_outputs is not None and not reader_frozen:
            whiteness_term = whiteness.pool_penalty(self.extractor, self.whitening_outputs, self.whiteness_batch,
                                                    self.device)
            loss = loss + self.whiteness_weight * whiteness_term
        if worst_case:
            bce_wc = self._backward_with_worst_case(loss, bce, latents, bits, carriers)
        else:
            bce_wc = torch.zeros((), device=self.device)
            self.manual_backward(loss)
        if reader_frozen:  # frozen by skipping its update, not requires_grad: plain DDP expects every gradient
            warmdown.drop_gradients(self.extractor)
        optimizer.step()
        self._check_finite(loss)

        with torch.no_grad():
            batch_psnr = psnr(out.detach(), base).mean()
            # dual ascent: raise the reconstruction weight while PSNR is below target
            self.log_rec_weight += self.rec_weight_lr * (self.psnr_target - batch_psnr).clamp(-5, 5)
            self.log_rec_weight.clamp_(math.log(1e-2), math.log(1e6))
            bit_acc = ((self.extractor(out.detach()) > 0).long() == bits).float().mean()
        self.log_dict(
            {
                "train/loss": loss.detach(),
                "train/rec_mse": rec.detach(),
                "train/bce": bce.detach(),
                "train/bce_wc": bce_wc.detach(),
                "train/whiteness": whiteness_term.detach(),
                "train/psnr": batch_psnr,
                "train/bit_acc": bit_acc,
                "train/rec_weight": rec_weight,
                "train/elapsed_s": time.perf_counter() - getattr(self, "_train_start", time.perf_counter()),
            },
            prog_bar=False,
        )
        self.history.append(
            {
                "step": int(self.global_step),
                "elapsed_s": round(time.perf_counter() - getattr(self, "_train_start", time.perf_counter()), 3),
                "bit_acc": round(bit_acc.item(), 5),
                "psnr": round(batch_psnr.item(), 3),
                "carriers": int(carriers),
            }
        )
        self.log("acc", bit_acc, prog_bar=True, logger=False)
        self.log("psnr", batch_psnr, prog_bar=True, logger=False)

    def _warmdown(self, optimizer) -> bool:
        """Set this step's learning rates; whether the reader is frozen now (re-whitened at the
        warm-down's first step; a run resumed later keeps the whitening its checkpoint saved)."""
        if not self.lr_warmdown_fraction:  # the configured rates stand (configure_optimizers)
            return False
        max_steps = self.trainer.max_steps if self._trainer is not None else None
        steps = warmdown.warmdown_steps(max_steps, self.lr_warmdown_fraction)
        warmdown.set_learning_rates(optimizer, (self.lr, self.decoder_lr),
                                    warmdown.lr_factor(self.global_step, max_steps, steps))
        frozen = self.warmdown_reader == "frozen" and warmdown.in_warmdown(self.global_step, max_steps, steps)
        if frozen and self.global_step == max_steps - steps and self.whitening_outputs is not None:
            self.refresh_whitening()
        return frozen

    def _check_finite(self, loss: torch.Tensor) -> None:
        """One error line instead of a run that trains on NaN to its end. Checked once the step is
        queued, where the history's ``.item()`` reads wait for the device anyway, so the check stalls
        nothing. float16 weights are the usual cause: Adam's update underflows and overflows in them."""
        if torch.isfinite(loss):
            return
        dtype = next(self.pnm.decoder.parameters()).dtype
        hint = ("model.dtype=float16 weights do not train: use float32 or bfloat16 (trainer.precision=bf16-mixed "
                "for speed)" if dtype == torch.float16 else "lower the learning rates (method.train.lr, decoder_lr)")
        raise ConfigError(f"training diverged at step {int(self.global_step)}: the loss is {loss.item()}; {hint}")

    def _wc_due(self) -> bool:
        """Whether this step carries the worst-case term (every ``wc_every``-th step)."""
        self._wc_calls = getattr(self, "_wc_calls", -1) + 1
        return self._wc_calls % self.wc_every == 0

    def _clean_pass_needs_weight_grads(self) -> bool:
        """The exact ascent differentiates the clean BCE, ``reuse`` reads the clean gradient;
        ``lagged`` needs neither once it holds a direction."""
        return self.wc_ascent != "lagged" or getattr(self, "_lagged_direction", None) is None

    def _backward_with_worst_case(self, loss, bce, latents, bits, carriers) -> torch.Tensor:
        """Backward of the clean ``loss`` and of ``lambda_wc * BCE`` at ``theta + delta*``;
        returns that BCE. The first ascent direction depends on ``wc_ascent`` (class docstring)."""
        weights = self.decoder_weights()
        if self.wc_ascent == "reuse":  # SAM: the clean loss's own gradient, no extra backward
            self.manual_backward(loss)
            grads = [None if w.grad is None else w.grad.detach().clone() for w in weights]
        elif self._clean_pass_needs_weight_grads():  # the fingerprint loss alone: one more backward
            grads = list(torch.autograd.grad(bce, weights, retain_graph=True, allow_unused=True))
            self.manual_backward(loss)
        else:  # lagged: the previous step's worst-case gradient
            grads = self._lagged_direction
            self.manual_backward(loss)
        self._weights_require_grad(weights, True)
        # lagged needs the worst-case term's gradient alone; a trained decoder already holds the clean one
        lagged = self.wc_ascent == "lagged"
        before = [None if w.grad is None else w.grad.detach().clone() for w in weights] if lagged else None
        rho = self.wc_rho * min(1.0, (self.global_step + 1) / self.wc_rho_ramp) if self.wc_rho_ramp else self.wc_rho
        deltas = worst_case_perturbation(weights, grads, rho)
        originals = [w.detach().clone() for w in weights]  # restored by copy: bit-exact
        try:
            set_perturbed(weights, originals, deltas)
            for _ in range(self.wc_steps - 1):
                inner = self.fingerprint_loss(self.pnm(latents, bits, carriers), bits)
                grads = torch.autograd.grad(inner, weights, allow_unused=True)
                deltas = worst_case_perturbation(originals, list(grads), rho, previous=deltas)
                set_perturbed(weights, originals, deltas)
            bce_wc = self.fingerprint_loss(self.pnm(latents, bits, carriers), bits)
            self.manual_backward(self.lambda_wc * bce_wc)
        finally:
            set_perturbed(weights, originals, None)
        if lagged:  # this term's own gradient becomes the next direction
            self._lagged_direction = [
                None if w.grad is None else w.grad.detach().clone() - (0 if b is None else b)
                for w, b in zip(weights, before)
            ]
        if not self.train_decoder:  # the shared decoder is not trained: drop its gradients
            for w in weights:
                w.grad = None
            self._weights_require_grad(weights, False)
        return bce_wc

    def _weights_require_grad(self, weights: list[nn.Parameter], flag: bool) -> None:
        if not self.train_decoder:
            for w in weights:
                w.requires_grad_(flag)

    # The training curve travels inside the module's state: with ddp_spawn the steps run in child
    # processes and only the state dict comes back to the main process (which writes the outputs),
    # and a resumed run (requeued SLURM job) keeps the curve of the steps before the interruption.
    def get_extra_state(self) -> dict:
        return {"history": list(self.history)}

    def set_extra_state(self, state: dict) -> None:
        self.history = list(state.get("history", []))

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # checkpoints written before the curve was part of the state: resume with an empty curve
        checkpoint["state_dict"].setdefault("_extra_state", {"history": []})
        # ... or before the frozen reference was: it still holds the base here, untouched by training
        if self.reference_pnm is not None:
            for key, value in self.reference_pnm.state_dict().items():
                checkpoint["state_dict"].setdefault(f"reference_pnm.{key}", value)

    def validation_step(self, batch, batch_idx):
        images = batch["image"]
        latents = self.encode(images)
        generator = torch.Generator().manual_seed(10_000 + batch_idx)
        bits = self.random_bits(len(images), generator)
        base = self.reference(latents)
        out = self.pnm(latents, bits)
        bit_acc = ((self.extractor(out) > 0).long() == bits).float().mean()
        self.log_dict({"val/bit_acc": bit_acc, "val/psnr": psnr(out, base).mean(), "val/ssim": ssim(out, base)},
                      prog_bar=True, batch_size=len(images))

    def configure_optimizers(self):
        groups = [{"params": self.pnm.pnm_parameters() + list(self.extractor.parameters()), "lr": self.lr}]
        if self.train_decoder:
            groups.append({"params": self.decoder_weights(), "lr": self.decoder_lr})
        encoder = {id(p) for p in encoder_parameters(self.vae)}
        if any(id(p) in encoder for group in groups for p in group["params"]):
            raise RuntimeError("an encoder parameter reached the fingerprint optimizer; the encoder must stay frozen")
        return torch.optim.AdamW(groups, weight_decay=0.0)
