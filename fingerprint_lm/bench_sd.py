"""Issuing one copy at Stable Diffusion's decoder size (``make bench``'s ``issue_sd`` section).

The embedded default's decoder is tiny, so its issue ratio says little about a real model's. This
builds an SD-sized VAE (``SD_VAE_CONFIG``, random weights: the cost of a copy does not depend on
what the weights are) and times what each method pays for one copy there.
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch

from fingerprint_lm.distributor.bench import predicted_screen_cost, probe_read_cost
from fingerprint_lm.methods import personal_tensors
from fingerprint_lm.models.checkpoint import load_fingerprint_model, shipped_checkpoint
from fingerprint_lm.models.vae import SD_VAE_CONFIG, build_vae

SIGNATURE_RECIPE_STEPS = 100  # conf/method/stable_signature.yaml, and Stable Signature's own recipe


def _sd_method_model(method: str, vae, bits: int, resolution: int, copy_finetune: dict | None = None):
    """A ``method`` model from its ``conf/method/*.yaml`` on an SD-sized VAE (random weights)."""
    from hydra.utils import instantiate  # hydra only for this section: the others never compose configs

    from fingerprint_lm.tasks.compose import method_config  # hydra's compose API, as above

    # _convert_: plain dicts and lists, as the training task builds methods (a method checks its mappings)
    model = instantiate(method_config(method), _convert_="all").build_model(vae, bits)
    model.meta["resolution"] = resolution
    if copy_finetune is not None:
        model.meta["copy_finetune"] = {**model.meta.get("copy_finetune", {}), **copy_finetune}
    return model


def issue_cost_sd(resolution: int = 256, batch_size: int = 4, steps: tuple[int, int] = (1, 3),
                  repeats: int = 10, bits: int = 48) -> dict:
    """Issuing one copy on an SD-sized decoder (``SD_VAE_CONFIG``, 83.7M parameters): pnm timed
    ``repeats`` times (median), stable_signature's per-copy fine-tune timed at two step counts after
    an untimed warm-up. Its 100-step recipe would take about an hour here, so that figure is an
    estimate, ``fixed + 100 * per_step``, from the two measured runs (named as one wherever shown).
    So is a screened pnm copy's: one draw's probe read timed at two probe sizes, scaled to the
    shipped checkpoint's probe and draws (``1 / pass_rate``) and added to the unscreened issue. A
    copy screened by the read predictor adds the predicted screen's time (it reads the code only,
    so it is timed on the shipped checkpoint); the predictor's fit, once per checkpoint, is
    estimated as its fit codes times one probe read here."""
    steps_a, steps_b = steps
    torch.manual_seed(0)
    vae = build_vae(SD_VAE_CONFIG).eval()
    rng = np.random.default_rng(0)

    def issue(model):  # a new code each time: nothing memoised
        return personal_tensors(model, rng.integers(0, 2, bits, dtype=np.uint8), "all", int(rng.integers(2**31)))

    pnm = _sd_method_model("pnm", vae, bits, resolution)
    issue(pnm)  # warm-up
    pnm_times = []
    for _ in range(repeats):
        start = time.perf_counter()
        issue(pnm)
        pnm_times.append(time.perf_counter() - start)

    screen = load_fingerprint_model(shipped_checkpoint("embedded_pnm")).meta["issue_screen"]  # its probe, its rate
    probe = probe_read_cost(pnm)
    draw_s = probe["probe_fixed_s"] + screen["probe_images"] * probe["probe_per_image_s"]
    predicted = predicted_screen_cost()  # reads the code only: the same cost at any decoder size

    def signature(n_steps: int):  # pool: the images the steps draw from
        recipe = {"steps": n_steps, "batch_size": batch_size, "pool": batch_size * steps_b}
        return _sd_method_model("stable_signature", vae, bits, resolution, recipe)

    issue(signature(1))  # untimed: the allocator's and the kernels' first-call costs
    timed = {}
    for n_steps in (steps_a, steps_b):
        model = signature(n_steps)
        start = time.perf_counter()
        issue(model)
        timed[n_steps] = time.perf_counter() - start
    per_step = (timed[steps_b] - timed[steps_a]) / (steps_b - steps_a)
    fixed = timed[steps_a] - steps_a * per_step
    estimate = fixed + SIGNATURE_RECIPE_STEPS * per_step
    pnm_s = statistics.median(pnm_times)
    return {
        "parameters_m": sum(p.numel() for p in vae.parameters()) / 1e6, "bits": bits,
        "resolution": resolution, "batch_size": batch_size,
        "pnm_issue_s": pnm_s, "pnm_issue_s_all": pnm_times,
        "stable_signature_steps_timed": [steps_a, steps_b],
        "stable_signature_s_timed": [timed[steps_a], timed[steps_b]],
        "stable_signature_per_step_s": per_step, "stable_signature_fixed_s": fixed,
        "stable_signature_100_steps_estimate_s": estimate, "ratio_estimate": estimate / pnm_s, **probe,
        "screened_issue_estimate_s": pnm_s + draw_s / screen["pass_rate"],
        "screened_ratio_estimate": estimate / (pnm_s + draw_s / screen["pass_rate"]),
        "predicted_issue_s": pnm_s + predicted["predicted_screen_s"],
        "predicted_ratio_estimate": estimate / (pnm_s + predicted["predicted_screen_s"]),
        "predictor_fit_estimate_s": predicted["predictor_fit_codes"] * draw_s,  # once per checkpoint
    }
