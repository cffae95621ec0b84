"""What issuing one copy costs at Stable Diffusion's decoder size: pnm against stable_signature
(issue 14: the target is stable_signature >= 10^4x pnm; ``make bench`` measures it on the tiny
embedded decoder only).

Both methods are built from their ``conf/method/*.yaml`` on an SD-sized ``AutoencoderKL``
(``models.vae.SD_VAE_CONFIG``: 83.7M parameters, random weights: the cost of either path does
not depend on the values) and issue through the same call the distributor makes,
``methods.base.personal_tensors(model, code, "all", seed)``:

- pnm: the mapping network, every GroupNorm's affine values, ACT over every tensor; timed
  ``--repeats`` times, a new code each time, the median kept (single calls here range over 0.1-0.9 s:
  a copy allocates and writes the whole 335 MB state dict, and the allocator's page faults vary).
- stable_signature: the per-copy fine-tune (``methods.stable_signature.finetune_copy``: model
  digest, pool encoding, AdamW steps of decoder + reader, then ACT) at ``--resolution`` and
  ``--batch-size``. Its 100 steps would take most of an hour per resolution on this CPU, so the run is
  timed at two step counts (``--steps-a``, ``--steps-b``): their difference gives the seconds per
  step, the rest is the fixed part; the 100-step figure is ``fixed + 100 * per_step`` (an
  estimate from measured parts, named as one in the table).

    python experiments/issue_cost_sd.py --resolution 64 --batch-size 4

Rows are appended to ``results/issue_cost_sd.jsonl``; the table is printed.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

import fingerprint_lm  # noqa: F401  (registers the config resolvers and schemas)
from fingerprint_lm.errors import exit_on_user_error
from fingerprint_lm.methods.base import personal_tensors
from fingerprint_lm.models.vae import SD_VAE_CONFIG, build_vae

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results" / "issue_cost_sd.jsonl"
RECIPE_STEPS = 100  # conf/method/stable_signature.yaml, and Stable Signature's own recipe


def build(method: str, vae, bits: int, resolution: int, copy_finetune: dict | None = None):
    cfg = OmegaConf.load(ROOT / "conf" / "method" / f"{method}.yaml")
    model = instantiate(cfg).build_model(vae, bits)
    model.meta["resolution"] = resolution
    if copy_finetune is not None:
        model.meta["copy_finetune"] = {**model.meta.get("copy_finetune", {}), **copy_finetune}
    return model


def timed(function, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return times


def measure(resolution: int, batch_size: int, steps_a: int, steps_b: int, repeats: int, bits: int) -> dict:
    torch.manual_seed(0)
    vae = build_vae(SD_VAE_CONFIG).eval()
    rng = np.random.default_rng(0)

    def issue(model):
        return personal_tensors(model, rng.integers(0, 2, bits, dtype=np.uint8), "all", int(rng.integers(2**31)))

    pnm = build("pnm", vae, bits, resolution)
    issue(pnm)  # warm-up
    pnm_times = timed(lambda: issue(pnm), repeats)
    print(f"pnm: {statistics.median(pnm_times):.3f} s per copy (median of {repeats})", flush=True)

    def signature(steps: int):
        # pool = the images the steps draw from; a fresh code each time, so nothing is memoised
        recipe = {"steps": steps, "batch_size": batch_size, "pool": batch_size * max(steps_a, steps_b)}
        return build("stable_signature", vae, bits, resolution, recipe)

    issue(signature(1))  # untimed: the allocator's and the kernels' first-call costs
    signature_times = {}
    for steps in (steps_a, steps_b):
        model = signature(steps)
        signature_times[steps] = timed(lambda model=model: issue(model), 1)[0]
        print(f"stable_signature, {steps} steps: {signature_times[steps]:.1f} s", flush=True)
    per_step = (signature_times[steps_b] - signature_times[steps_a]) / (steps_b - steps_a)
    fixed = signature_times[steps_a] - steps_a * per_step
    estimate = fixed + RECIPE_STEPS * per_step
    pnm_s = statistics.median(pnm_times)
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "decoder": "SD_VAE_CONFIG (random weights)",
        "parameters_m": sum(p.numel() for p in vae.parameters()) / 1e6,
        "bits": bits, "resolution": resolution, "batch_size": batch_size,
        "pnm_issue_s": pnm_s, "pnm_issue_s_all": pnm_times,
        "stable_signature_steps_timed": [steps_a, steps_b],
        "stable_signature_s_timed": [signature_times[steps_a], signature_times[steps_b]],
        "stable_signature_per_step_s": per_step, "stable_signature_fixed_s": fixed,
        "stable_signature_100_steps_estimate_s": estimate,
        "ratio_estimate": estimate / pnm_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps-a", type=int, default=2)
    parser.add_argument("--steps-b", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--bits", type=int, default=48)
    args = parser.parse_args()
    if not 0 < args.steps_a < args.steps_b:
        raise SystemExit("error: need 0 < --steps-a < --steps-b")
    row = measure(args.resolution, args.batch_size, args.steps_a, args.steps_b, args.repeats, args.bits)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as f:
        f.write(json.dumps(row) + "\n")
    print("| decoder | px, batch | pnm copy | stable_signature: fixed + per step | 100 steps (estimate) | ratio |")
    print("|---|---|---|---|---|---|")
    print(f"| SD-sized, {row['parameters_m']:.1f}M params | {row['resolution']}, {row['batch_size']} "
          f"| {row['pnm_issue_s']:.2f} s | {row['stable_signature_fixed_s']:.1f} s + "
          f"{row['stable_signature_per_step_s']:.2f} s | {row['stable_signature_100_steps_estimate_s']:.0f} s "
          f"| {row['ratio_estimate']:.0f}x |")


if __name__ == "__main__":
    exit_on_user_error(main)
