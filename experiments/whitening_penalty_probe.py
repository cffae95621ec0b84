"""Keep pnm's learned reader whitened while it trains, instead of re-fitting its whitening after
(issue 11).

The band reader's logits are whitened on unmarked images: ``gain * W (raw - centre)``, fitted in
closed form. While the reader's filters train, that fit goes stale. Re-fitting it after training
moves every logit that training optimised, and costs about 0.07 bit accuracy.
``differential_reader_probe.py``'s plain arm shows it: 0.937 held out with the whitening training
aimed at, 0.865 re-fitted. Re-fitting it as training goes stalls learning
(``results/whitening_table.md``). The shipped recipe therefore freezes the reader for the last
quarter.

This probe tries a third way: a penalty that keeps the reader's outputs on unmarked images white
as it trains. The outputs are divided by the gain, for a random batch of ``--pool-batch`` of 2048
unmarked decoder outputs each step (in the clean pass only, not again in the worst-case one).
The penalty is their mean squared plus their covariance's
squared distance from the identity, weighted by ``--weights``. The fitted whitening then has
little left to correct.

Each arm warm-starts from the shipped checkpoint with ``lr_warmdown_probe``'s continuation
(``--warmup`` steps at constant rates, then a warm-down to 0 over ``--steps``, the reader training
throughout), the control being ``differential_reader_probe.py``'s plain arm. Each arm reports:

- its held-out bit accuracy read with the training's whitening and re-fitted (what ships);
- for the training's whitening, on 2048 unmarked images: the fraction of 1-bits and the largest
  correlation between two logits.

    python experiments/whitening_penalty_probe.py --weights 1 10

Rows are appended to ``results/whitening_penalty_probe.jsonl``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from lr_warmdown_probe import continue_training

from fingerprint_lm.data.datamodule import ImageDataModule
from fingerprint_lm.errors import ConfigError, check_int, exit_on_user_error
from fingerprint_lm.lit.whiteness import whiteness_penalty
from fingerprint_lm.methods.base import collect_images
from fingerprint_lm.methods.pnm import unmarked_outputs
from fingerprint_lm.storage import append_jsonl

RESULTS = Path(__file__).resolve().parent / "results" / "whitening_penalty_probe.jsonl"


def with_whiteness_penalty(weight: float, pool_batch: int, seed: int):
    """A ``prepare`` hook: 2048 unmarked outputs of the training data, and the clean pass's
    fingerprint loss plus ``weight`` times the penalty on a random batch of them. The twin of
    ``FingerprintModule(whiteness_weight=...)``, kept here with its own seeded draws and pool so
    that the recorded rows reproduce."""

    def prepare(module) -> None:
        data = ImageDataModule(source="synthetic", resolution=32, batch_size=32, seed=seed + 7, test_size=512)
        data.setup("fit")
        pool = unmarked_outputs(module, collect_images(data.train_dataloader(), 2048))
        generator = torch.Generator().manual_seed(seed)
        reader, original = module.extractor, module.fingerprint_loss
        penalised_step = [-1]

        def loss(outputs: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
            if module.global_step == penalised_step[0]:  # the worst-case pass: once a step is enough
                return original(outputs, bits)
            penalised_step[0] = module.global_step
            index = torch.randint(0, len(pool), (pool_batch,), generator=generator)
            unmarked = reader(pool[index].to(outputs.device))
            return original(outputs, bits) + weight * whiteness_penalty(unmarked, reader.gain)

        module.fingerprint_loss = loss

    return prepare


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="embedded_pnm")
    parser.add_argument("--weights", type=float, nargs="+", default=[1.0, 10.0],
                        help="penalty weights, one arm each (> 0)")
    parser.add_argument("--pool-batch", type=int, default=256, help="unmarked outputs the penalty reads a step (> 48)")
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    check_int("--steps", args.steps)
    check_int("--warmup", args.warmup, 0)
    check_int("--pool-batch", args.pool_batch, 49)
    if any(not w > 0 for w in args.weights):
        raise ConfigError(f"every --weights must be > 0, got {args.weights}")
    rows = []
    for weight in args.weights:
        row = continue_training(args.checkpoint, "warmdown", args.steps, args.warmup, args.seed,
                                prepare=with_whiteness_penalty(weight, args.pool_batch, args.seed))
        row.update(arm="whiteness_penalty", weight=weight, pool_batch=args.pool_batch, penalty_passes="clean")
        rows.append(row)
        append_jsonl(RESULTS, row)
    print(f"{args.warmup} steps at constant rates, then {args.steps} warmed down to 0; 512 held-out images")
    print("| penalty weight | train s | PSNR dB | training's whitening | re-fitted (ships) "
          "| unmarked 1-bits, training's | max corr, training's |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['weight']:g} | {r['train_seconds']:.0f} | {r['psnr']:.2f} | "
              f"{r['bit_acc_before_rewhitening']:.3f} | "
              f"{r['bit_acc']:.3f} | {r['stale_one_bits']:.3f} | {r['stale_max_corr']:.3f} |")


if __name__ == "__main__":
    exit_on_user_error(main)
