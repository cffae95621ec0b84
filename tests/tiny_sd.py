"""A tiny Stable Diffusion folder built from random weights (UNet, CLIP text model, a byte-level
tokenizer) around a given VAE, saved as a diffusers pipeline folder: text-to-image without downloads."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fingerprint_lm.models.checkpoint import SHIPPED_CHECKPOINT

MAX_TOKENS = 77  # CLIP's; one token per character here, so captions fit


def byte_alphabet() -> list[str]:
    """The 256 characters a byte-level BPE writes bytes as: printable Latin-1 bytes stand for
    themselves, the others (controls, space, ...) are moved to code points from 256 up."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    shifted = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]


def write_tiny_tokenizer(folder: Path) -> Path:
    """vocab.json + merges.txt of a CLIP BPE with no merges: every byte is a token, alone or
    word-final (``</w>``), so any caption tokenizes without unknown tokens."""
    alphabet = byte_alphabet()
    tokens = [*alphabet, *(c + "</w>" for c in alphabet), "<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return folder


def build_tiny_pipeline(folder: Path) -> Path:
    """Save a StableDiffusionPipeline with a tiny UNet and CLIP text model and the embedded
    checkpoint's base VAE (4 latent channels, factor 4: 32 px images from 8x8 latents)."""
    # deferred: diffusers' pipeline classes and transformers' CLIP models load lazily and slowly (seconds), and
    # this module is imported at collection; only the text-to-image tests build a pipeline
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(
        write_tiny_tokenizer(folder.parent / "tokenizer_source"), model_max_length=MAX_TOKENS
    )
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=MAX_TOKENS,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    scheduler = DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    vae = AutoencoderKL.from_pretrained(SHIPPED_CHECKPOINT / "base_vae", low_cpu_mem_usage=False)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    return folder


