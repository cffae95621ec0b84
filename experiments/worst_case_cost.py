"""Issue 14: the worst-case term's cost against what it buys. Trains the shipped carrier recipe
(``+experiment=train``: 600 steps, 48 bits) on the shipped checkpoint's base VAE once per variant
of the ascent, then scores model-level attacks on a fresh copy the way the sweep does
(``evaluation.collusion.evaluate_point``: 256 held-out images, 1000 innocents, act none).

    python experiments/worst_case_cost.py [VARIANT ...] [--steps 600] [--threads 2]

Variants: ``exact`` (a second backward for the fingerprint loss alone), ``reuse`` (SAM: the clean
loss's gradient), ``lagged`` (the previous step's worst-case gradient), ``every2`` (the exact term
on every other step), ``plain`` (K = 0). The step-cost ratio is timed here on a batch of 32 (the
same as ``make bench``), the training wall time alone on the machine. Rows are appended to
``results/worst_case_cost.jsonl``; the table is printed and written to ``results/worst_case_cost.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from hydra.utils import instantiate
from model_attack_table import score_model  # experiments/ is on sys.path when run as a script
from recipe_search import compose_cfg

from fingerprint_lm.bench import manual_stepping
from fingerprint_lm.lit.fingerprinting import FingerprintModule
from fingerprint_lm.models.checkpoint import load_fingerprint_model
from fingerprint_lm.storage import append_jsonl
from fingerprint_lm.tasks.train import method_from_config, quiet_trainer_factory, train_from_config

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
VARIANTS: dict[str, dict] = {
    "exact": {"wc_ascent": "exact"},
    "reuse": {"wc_ascent": "reuse"},
    "lagged": {"wc_ascent": "lagged"},
    "every2": {"wc_ascent": "exact", "wc_every": 2},
    "plain": {"wc_steps": 0},
}
# The sweep's model attacks at its strengths, then stronger ones (the carrier survives the first).
CASES = ("none_c1", "weight_noise_0.05", "prune_0.3", "quantize_int8", "finetune_50",
         "weight_noise_0.2", "weight_noise_0.4", "prune_0.7", "finetune_500")


def step_seconds(vae, method, options: dict, steps: int = 12) -> float:
    """Mean seconds of a training step outside a Trainer (batch 32, 32 px), after 3 warm-up steps."""
    model = method.build_model(vae, 48)
    train = {**method.train, **options}
    module = manual_stepping(FingerprintModule(vae, model.pnm, model.extractor, **train))
    images = torch.rand(32, 3, 32, 32) * 2 - 1
    times = []
    for i in range(steps + 3):
        start = time.perf_counter()
        module.training_step({"image": images}, i)
        times.append(time.perf_counter() - start)
    return statistics.mean(times[3:])  # mean, not median: every2 alternates cheap and dear steps


def run_variant(name: str, steps: int, shipped) -> dict:
    options = VARIANTS[name]
    cfg = compose_cfg([f"method.steps={steps}", "logger=none", *(f"method.train.{k}={v}" for k, v in options.items())])
    method = method_from_config(cfg)
    datamodule = instantiate(cfg.data)
    make_trainer = quiet_trainer_factory(cfg, enable_progress_bar=False, limit_val_batches=0)

    vae = shipped.vae
    plain_step = step_seconds(vae, method, {"wc_steps": 0})
    variant_step = step_seconds(vae, method, options)
    start = time.perf_counter()
    model, _, facts = train_from_config(cfg, vae, datamodule, make_trainer, method=method)
    train_seconds = time.perf_counter() - start
    row = {"variant": name, "steps": facts["steps"], "train_s": round(train_seconds, 1),
           "step_cost_ratio": round(variant_step / plain_step, 2)}
    return {**row, **score_model(model, CASES)}


def write_table(rows: list[dict]) -> str:
    keys = ["variant", "step_cost_ratio", "train_s", "psnr", *CASES]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(row.get(k, "")) for k in keys) + " |" for row in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("variants", nargs="*", default=list(VARIANTS), choices=sorted(VARIANTS))
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shipped = load_fingerprint_model()  # its base VAE: no cold pretraining
    rows = []
    for name in args.variants:
        row = run_variant(name, args.steps, shipped)
        rows.append(row)
        print(json.dumps(row), flush=True)
        append_jsonl(RESULTS / "worst_case_cost.jsonl",  # one row at a time
                     {"date": time.strftime("%Y-%m-%d %H:%M"), "threads": args.threads, **row})
    table = write_table(rows)
    print(table)
    (RESULTS / "worst_case_cost.md").write_text(
        f"`python experiments/worst_case_cost.py {' '.join(args.variants)} --steps {args.steps}` "
        f"({time.strftime('%Y-%m-%d')}, {args.threads} threads; bit accuracy of a fresh copy under each "
        f"model attack, 256 held-out images)\n\n{table}\n")


if __name__ == "__main__":
    main()
