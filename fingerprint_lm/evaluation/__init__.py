"""Evaluations that run a full generator, not only the VAE: ``text2image`` drives a local
Stable Diffusion folder with a user's copy swapped in (``task=text2image_eval``)."""
