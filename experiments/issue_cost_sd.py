"""What issuing one copy costs at Stable Diffusion's decoder size: pnm against stable_signature
(issue 14: the target is stable_signature >= 10^4x pnm). ``make bench`` runs the same measurement
(``bench.issue_cost_sd``) at 256 px, batch 4, steps 1 and 3, as its ``issue_sd`` section; this
script runs it at other settings and keeps the rows.

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
import platform
import time
from pathlib import Path

import torch

import fingerprint_lm  # noqa: F401  (registers the config resolvers and schemas)
from fingerprint_lm.bench_sd import issue_cost_sd
from fingerprint_lm.errors import exit_on_user_error
from fingerprint_lm.storage import append_jsonl

RESULTS = Path(__file__).resolve().parent / "results" / "issue_cost_sd.jsonl"


def measure(resolution: int, batch_size: int, steps_a: int, steps_b: int, repeats: int, bits: int) -> dict:
    """``make bench``'s ``issue_sd`` section (``bench.issue_cost_sd``) at these settings."""
    row = issue_cost_sd(resolution, batch_size, (steps_a, steps_b), repeats, bits)
    return {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
        "decoder": "SD_VAE_CONFIG (random weights)", **row,
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
    append_jsonl(RESULTS, row)
    print("| decoder | px, batch | pnm copy | stable_signature: fixed + per step | 100 steps (estimate) | ratio |")
    print("|---|---|---|---|---|---|")
    print(f"| SD-sized, {row['parameters_m']:.1f}M params | {row['resolution']}, {row['batch_size']} "
          f"| {row['pnm_issue_s']:.2f} s | {row['stable_signature_fixed_s']:.1f} s + "
          f"{row['stable_signature_per_step_s']:.2f} s | {row['stable_signature_100_steps_estimate_s']:.0f} s "
          f"| {row['ratio_estimate']:.0f}x |")


if __name__ == "__main__":
    exit_on_user_error(main)
