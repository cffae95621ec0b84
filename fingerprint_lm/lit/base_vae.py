"""Pretraining of the tiny base VAE on the embedded data (the real-scale path loads SD's VAE)."""

from __future__ import annotations

import lightning as L
import torch
from diffusers import AutoencoderKL
from torch.nn import functional as F

from fingerprint_lm.metrics.quality import psnr
from fingerprint_lm.models.vae import freeze_encoder as freeze_vae_encoder


class BaseVAEModule(L.LightningModule):
    """Trains an ``AutoencoderKL`` on reconstruction (MSE + L1) with a small KL term.

    Parameters:
        vae: the autoencoder to train.
        lr: AdamW learning rate.
        kl_weight: weight of the KL divergence (small: the latent only needs to be decodable).
        freeze_encoder: train the decoder side only (``post_quant_conv`` + decoder) on the
            latents of a fixed encoder, e.g. when a diffusion model was trained on its latents.
    """

    def __init__(self, vae: AutoencoderKL, lr: float = 2e-3, kl_weight: float = 1e-6, freeze_encoder: bool = False):
        super().__init__()
        self.vae = vae
        self.lr = lr
        self.kl_weight = kl_weight
        self.freeze_encoder = freeze_encoder
        if freeze_encoder:
            freeze_vae_encoder(vae)

    def on_train_epoch_start(self) -> None:
        if self.freeze_encoder:
            freeze_vae_encoder(self.vae)  # the Trainer put every submodule in train mode

    def training_step(self, batch, batch_idx):
        images = batch["image"]
        with torch.set_grad_enabled(not self.freeze_encoder):
            posterior = self.vae.encode(images).latent_dist
        recon = self.vae.decode(posterior.sample()).sample
        rec_loss = F.mse_loss(recon, images) + 0.1 * F.l1_loss(recon, images)
        loss = rec_loss + self.kl_weight * posterior.kl().mean()
        self.log("base_vae/train_loss", loss, prog_bar=True)
        self.log("base_vae/train_psnr", psnr(recon.detach(), images).mean(), prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        images = batch["image"]
        recon = self.vae.decode(self.vae.encode(images).latent_dist.mode()).sample
        self.log("base_vae/val_psnr", psnr(recon, images).mean(), prog_bar=True)

    def configure_optimizers(self):
        params = [p for p in self.vae.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=0.0)
        steps = self.trainer.max_steps if self.trainer and self.trainer.max_steps > 0 else 1000
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=self.lr, total_steps=steps, pct_start=0.1)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
