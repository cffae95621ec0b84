"""Issue 13: do arcsine-biased Tardos codes catch more colluders than the registry's uniform codes,
at this project's code lengths and false-accusation rates?

A bit-level simulation (no images, no models: what the code and the score alone can do). The
registry holds ``--users`` codes; ``c`` of them collude. Where the colluders' bits agree the
pirate copy carries that bit (the marking assumption); where they differ it carries the bit the
collusion strategy picks:

- ``interleave``: each position from a random colluder (image mixing, or a per-layer merge);
- ``majority``: the colluders' majority, a coin on ties (weight averaging reads close to this).

Then each pirate bit is flipped with probability ``--read-error`` (the extractor is not perfect).
Every registered code is scored with the symmetric Tardos score
(:func:`fingerprint_lm.registry.tardos.tardos_scores`) and accused above a threshold that holds
the stated fpr (Bonferroni over the registry) for any biases:

- ``chernoff``: :func:`~fingerprint_lm.registry.tardos.tardos_threshold`, Chernoff's bound given
  the pirate bits and the biases (what the project ships);
- ``bernstein``: ``a + sqrt(a^2 + 2 L m)``, ``a = L M / 3``, ``L = ln(N / fpr)``, with ``M =
  sqrt((1 - t) / t)`` the largest term (what it used before; it grows with the cutoff's ``M``).

    python experiments/tardos_bias_sim.py                   # the table in results/tardos_bias_sim.md

Prints a markdown table (P[at least one colluder caught], mean colluders caught, innocents
accused in all trials) and writes it to ``experiments/results/tardos_bias_sim.md``.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np

from fingerprint_lm.registry.tardos import arcsine_biases, draw_tardos_codes, tardos_scores, tardos_threshold

RESULTS = Path(__file__).resolve().parent / "results" / "tardos_bias_sim.md"


def pirate_copy(colluder_codes: np.ndarray, strategy: str, read_error: float, rng: np.random.Generator) -> np.ndarray:
    """The bits read from the colluders' pirate copy (0/1 ``[m]``)."""
    c, m = colluder_codes.shape
    if strategy == "interleave":
        bits = colluder_codes[rng.integers(0, c, m), np.arange(m)]
    elif strategy == "majority":
        ones = colluder_codes.sum(axis=0)
        bits = np.where(2 * ones > c, 1, np.where(2 * ones < c, 0, rng.integers(0, 2, m)))
    else:
        raise ValueError(f"unknown strategy {strategy!r}")
    flips = rng.random(m) < read_error
    return np.where(flips, 1 - bits, bits).astype(np.int8)


def bernstein_threshold(m: int, n_users: int, fpr: float, cutoff: float | None) -> float:
    bound = 1.0 if cutoff is None else math.sqrt((1 - cutoff) / cutoff)
    log_term = math.log(n_users / fpr)
    a = log_term * bound / 3.0
    return a + math.sqrt(a * a + 2.0 * log_term * m)


def simulate(m: int, cutoff: float | None, bound: str, c: int, strategy: str, args, rng: np.random.Generator) -> dict:
    """``cutoff`` None: uniform codes (every bias 1/2)."""
    caught_any, caught, innocents = 0, 0, 0
    for _ in range(args.trials):
        biases = np.full(m, 0.5) if cutoff is None else arcsine_biases(m, cutoff, rng)
        codes = draw_tardos_codes(args.users, biases, rng)
        colluders = rng.choice(args.users, size=c, replace=False)
        pirate = pirate_copy(codes[colluders], strategy, args.read_error, rng)
        scores = tardos_scores(pirate, codes, None if cutoff is None else biases)
        if bound == "chernoff":
            threshold = tardos_threshold(pirate, args.users, args.fpr, None if cutoff is None else biases)
        else:
            threshold = bernstein_threshold(m, args.users, args.fpr, cutoff)
        accused = scores >= threshold
        n_caught = int(accused[colluders].sum())
        caught_any += n_caught > 0
        caught += n_caught
        innocents += int(accused.sum()) - n_caught
    return {"p_catch": caught_any / args.trials, "mean_caught": caught / args.trials, "innocents": innocents}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[48, 64, 128, 256])
    parser.add_argument("--colluders", type=int, nargs="+", default=[2, 3, 5])
    parser.add_argument("--cutoffs", type=float, nargs="+", default=[0.2, 0.1, 0.05])
    parser.add_argument("--strategies", nargs="+", default=["interleave", "majority"])
    parser.add_argument("--bounds", nargs="+", default=["bernstein", "chernoff"])
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--fpr", type=float, default=1e-6)
    parser.add_argument("--read-error", type=float, default=0.0)
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    start = time.perf_counter()
    codes = [("uniform", None)] + [(f"arcsine t={t:g}", t) for t in args.cutoffs]
    schemes = [(f"{name}, {bound}", (cutoff, bound)) for bound in args.bounds for name, cutoff in codes]
    header = "| strategy | c | bits | " + " | ".join(name for name, _ in schemes) + " |"
    lines = [
        f"`python experiments/tardos_bias_sim.py` ({args.users} registered users, fpr {args.fpr:g}, read error "
        f"{args.read_error:g}, {args.trials} trials per cell, seed {args.seed}). Each cell: P[at least one "
        "colluder accused] / mean colluders accused; innocents accused over all trials in brackets.",
        "",
        header,
        "|" + "---|" * (3 + len(schemes)),
    ]
    print(lines[0], "\n", header, sep="", flush=True)
    for strategy in args.strategies:
        for c in args.colluders:
            for m in args.lengths:
                cells = []
                for _, (cutoff, bound) in schemes:
                    r = simulate(m, cutoff, bound, c, strategy, args, rng)
                    cells.append(f"{r['p_catch']:.2f} / {r['mean_caught']:.2f} ({r['innocents']})")
                row = f"| {strategy} | {c} | {m} | " + " | ".join(cells) + " |"
                lines.append(row)
                print(row, flush=True)
    lines += ["", f"{time.perf_counter() - start:.0f} s on this machine."]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
