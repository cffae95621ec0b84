"""Training the PNM and the extractor, with the worst-case (minimax) weight-perturbation term.

Loss = w_rec * MSE(decoded_u, decoded_base) + lambda_fp * BCE(E(aug(decoded_u)), f_u)
       + lambda_wc * BCE(E(aug(decoded_u; theta + delta*)), f_u)

``delta*`` comes from K steps of normalised gradient ascent on the fingerprint loss, per decoder
tensor, inside ``||delta_t|| <= rho * ||theta_t||`` (AWP/SAM style). The first ascent direction
reuses the clean pass's backward, so a K-step worst-case step costs about (1 + K) plain steps.
``w_rec`` follows a PSNR target (dual ascent on log w_rec) so runs land at the fidelity asked for.
"""

from __future__ import annotations

import math
import time

import lightning as L
import torch
from diffusers import AutoencoderKL
from torch import nn
from torch.nn import functional as F

from fingerprint_lm.metrics.quality import psnr, ssim
from fingerprint_lm.models.augment import AugmentConfig, random_augment
from fingerprint_lm.models.extractor import FingerprintExtractor
from fingerprint_lm.models.pnm import PersonalizedDecoder


def worst_case_perturbation(
    params: list[nn.Parameter], grads: list[torch.Tensor | None], rho: float, previous: list[torch.Tensor] | None = None
) -> list[torch.Tensor]:
    """One normalised ascent step per tensor, projected onto ``||delta_t|| <= rho ||theta_t||``.

    With ``previous`` None the step lands on the ball's surface along the gradient (K = 1)."""
    deltas = []
    for i, (param, grad) in enumerate(zip(params, grads)):
        radius = rho * param.detach().norm()
        delta = torch.zeros_like(param) if previous is None else previous[i].clone()
        if grad is not None:
            delta = delta + radius * grad / grad.norm().clamp_min(1e-12)
        norm = delta.norm()
        if norm > radius:
            delta = delta * (radius / norm)
        deltas.append(delta)
    return deltas


class FingerprintModule(L.LightningModule):
    """Trains the PNM (mapping, heads, carriers) and the extractor; the base VAE is frozen.

    Parameters:
        vae: the base ``AutoencoderKL`` (its decoder is wrapped by ``pnm``; encoder used for latents).
        pnm: the personalised decoder wrapping ``vae.decoder``.
        extractor: image -> k logits.
        lr: AdamW learning rate of the PNM and extractor.
        lambda_fp: weight of the clean fingerprint BCE.
        lambda_wc: weight of the worst-case fingerprint BCE (ignored when ``wc_steps`` = 0).
        wc_steps: K, inner ascent steps (0 = plain training).
        wc_rho: relative radius of the weight perturbation per tensor.
        psnr_target: fidelity the reconstruction weight steers to (dB, fingerprinted vs base).
        rec_weight_init: initial reconstruction weight.
        rec_weight_lr: step of the dual update on log(rec weight).
        augment: training augmentations.
        train_decoder: also train the decoder's own weights (lower lr), so the mark can move into
            the main path; the base decoder output used as the reconstruction target stays fixed.
        decoder_lr: learning rate of the decoder's weights when ``train_decoder``.
        carrier_dropout: probability that a training batch is decoded without the carrier bias
            maps, so the main-path affine sites must carry the fingerprint on their own.
    """

    def __init__(
        self,
        vae: AutoencoderKL,
        pnm: PersonalizedDecoder,
        extractor: FingerprintExtractor,
        lr: float = 1e-3,
        lambda_fp: float = 1.0,
        lambda_wc: float = 1.0,
        wc_steps: int = 1,
        wc_rho: float = 0.01,
        psnr_target: float = 31.0,
        rec_weight_init: float = 100.0,
        rec_weight_lr: float = 0.01,
        augment: AugmentConfig | None = None,
        train_decoder: bool = False,
        decoder_lr: float = 1e-5,
        carrier_dropout: float = 0.0,
    ):
        super().__init__()
        self.automatic_optimization = False
        self.vae = vae
        self.pnm = pnm
        self.extractor = extractor
        self.lr = lr
        self.lambda_fp = lambda_fp
        self.lambda_wc = lambda_wc
        self.wc_steps = wc_steps
        self.wc_rho = wc_rho
        self.psnr_target = psnr_target
        self.rec_weight_lr = rec_weight_lr
        self.augment = augment or AugmentConfig()
        self.train_decoder = train_decoder
        self.decoder_lr = decoder_lr
        self.carrier_dropout = carrier_dropout
        self.history: list[dict] = []  # per-step training curve (written beside metrics.json)
        self.register_buffer("log_rec_weight", torch.tensor(math.log(rec_weight_init)))
        self.register_buffer("detector_fitted", torch.tensor(False))
        self.vae.requires_grad_(False)
        for weight in self.decoder_weights():
            weight.requires_grad_(train_decoder)
        for param in self.pnm.pnm_parameters():
            param.requires_grad_(True)
        self.vae.eval()

    # -- helpers ------------------------------------------------------------------------------
    @property
    def fingerprint_bits(self) -> int:
        return self.pnm.fingerprint_bits

    def random_bits(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randint(0, 2, (n, self.fingerprint_bits), generator=generator).to(self.device)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(images).latent_dist.mode()

    def decoder_weights(self) -> list[nn.Parameter]:
        """The copy's weights a worst-case perturbation acts on (everything a user holds)."""
        private = {id(p) for p in self.pnm.pnm_parameters()}
        return [p for n, p in self.pnm.named_parameters() if n.startswith(("decoder.", "post_quant_conv."))
                and id(p) not in private]

    @torch.no_grad()
    def calibrate_carriers(self, images: torch.Tensor, margin_db: float = 1.0, rounds: int = 4) -> float:
        """Scale the carrier amplitudes so the marked output sits ``margin_db`` above the PSNR
        target before training starts (MSE grows with amplitude squared, so a few rescalings
        converge). Returns the PSNR reached."""
        if self.pnm.spatial_site_name is None:
            return float("nan")
        latents = self.encode(images.to(self.device))
        base = self.pnm(latents, None)
        bits = self.random_bits(len(images))
        reached = float("nan")
        for _ in range(rounds):
            reached = psnr(self.pnm(latents, bits), base).mean().item()
            self.pnm.carrier_log_amplitude += (reached - self.psnr_target - margin_db) / 20 * math.log(10)
        return reached

    @torch.no_grad()
    def fit_detector(self, images: torch.Tensor, batch_size: int = 256) -> None:
        """Closed-form initialisation of the extractor's linear reader on fresh fingerprints."""
        outputs, bits = [], []
        for chunk in images.split(batch_size):
            chunk = chunk.to(self.device)
            chunk_bits = self.random_bits(len(chunk))
            outputs.append(self.pnm(self.encode(chunk), chunk_bits))
            bits.append(chunk_bits)
        self.extractor.fit_linear_head(torch.cat(outputs), torch.cat(bits))
        self.detector_fitted.fill_(True)

    def fingerprint_loss(self, images: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
        logits = self.extractor(random_augment(images, self.augment))
        return F.binary_cross_entropy_with_logits(logits, bits.to(logits.dtype))

    # -- training -----------------------------------------------------------------------------
    def on_train_start(self) -> None:
        self._train_start = time.perf_counter()

    def training_step(self, batch, batch_idx):
        optimizer = self.optimizers()
        images = batch["image"]
        latents = self.encode(images)
        with torch.no_grad():
            base = self.pnm(latents, None)
        bits = self.random_bits(len(images))
        rec_weight = self.log_rec_weight.exp()
        carriers = not (self.carrier_dropout > 0 and float(torch.rand(())) < self.carrier_dropout)

        weights = self.decoder_weights() if self.wc_steps > 0 else []
        if weights and not self.train_decoder:
            for w in weights:
                w.requires_grad_(True)
        optimizer.zero_grad(set_to_none=True)
        out = self.pnm(latents, bits, carriers)
        rec = F.mse_loss(out, base)
        bce = self.fingerprint_loss(out, bits)
        loss = rec_weight * rec + self.lambda_fp * bce
        bce_wc = torch.zeros((), device=self.device)
        if weights:
            # The ascent direction comes from the same forward pass as the clean loss.
            grads = torch.autograd.grad(bce, weights, retain_graph=True, allow_unused=True)
            self.manual_backward(loss)
            deltas = worst_case_perturbation(weights, list(grads), self.wc_rho)
            originals = [w.detach().clone() for w in weights]  # restored by copy: bit-exact
            try:
                self._perturb(weights, originals, deltas)
                for _ in range(self.wc_steps - 1):
                    inner = self.fingerprint_loss(self.pnm(latents, bits, carriers), bits)
                    grads = torch.autograd.grad(inner, weights, allow_unused=True)
                    deltas = worst_case_perturbation(originals, list(grads), self.wc_rho, previous=deltas)
                    self._perturb(weights, originals, deltas)
                bce_wc = self.fingerprint_loss(self.pnm(latents, bits, carriers), bits)
                self.manual_backward(self.lambda_wc * bce_wc)
            finally:
                self._perturb(weights, originals, None)
            if not self.train_decoder:
                for w in weights:
                    w.grad = None
                    w.requires_grad_(False)
        else:
            self.manual_backward(loss)
        optimizer.step()

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

    @staticmethod
    @torch.no_grad()
    def _perturb(weights: list[nn.Parameter], originals: list[torch.Tensor], deltas: list[torch.Tensor] | None) -> None:
        """Set ``weights`` to ``originals + deltas`` (``deltas`` None: back to the originals)."""
        for i, (w, original) in enumerate(zip(weights, originals)):
            w.copy_(original if deltas is None else original + deltas[i])

    def validation_step(self, batch, batch_idx):
        images = batch["image"]
        latents = self.encode(images)
        generator = torch.Generator().manual_seed(10_000 + batch_idx)
        bits = self.random_bits(len(images), generator)
        base = self.pnm(latents, None)
        out = self.pnm(latents, bits)
        bit_acc = ((self.extractor(out) > 0).long() == bits).float().mean()
        self.log_dict(
            {"val/bit_acc": bit_acc, "val/psnr": psnr(out, base).mean(), "val/ssim": ssim(out, base)},
            prog_bar=True,
            batch_size=len(images),
        )

    def configure_optimizers(self):
        groups = [{"params": self.pnm.pnm_parameters() + list(self.extractor.parameters()), "lr": self.lr}]
        if self.train_decoder:
            groups.append({"params": self.decoder_weights(), "lr": self.decoder_lr})
        return torch.optim.AdamW(groups, weight_decay=0.0)
