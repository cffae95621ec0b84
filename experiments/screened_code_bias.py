"""Are screened codes biased bit by bit? (issue 11; see results/screened_marked_null.md)

Draws ``--codes`` random codes, reads each on ``--probe`` probe images with the shipped pnm
checkpoint (``distributor/screening.py: ProbeReader``), keeps those that pass the checkpoint's
recorded floors, and prints how often each bit is 1 among them, against a fair coin's sampling noise.

    python experiments/screened_code_bias.py --codes 400 --probe 32
"""

from __future__ import annotations

import argparse

import numpy as np

from fingerprint_lm.distributor.screening import CodeScreen
from fingerprint_lm.errors import check_int, exit_on_user_error
from fingerprint_lm.models.checkpoint import load_fingerprint_model, shipped_checkpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--codes", type=int, default=400)
    parser.add_argument("--probe", type=int, default=32)
    parser.add_argument("--seed", type=int, default=3)
    args = parser.parse_args()
    check_int("--codes", args.codes)
    check_int("--probe", args.probe)
    model = load_fingerprint_model(shipped_checkpoint("embedded_pnm"))
    floors = model.meta["issue_screen"]
    screen = CodeScreen(model, None, floors["min_probe_bit_acc"], probe_images=args.probe,
                        min_psnr=floors["min_probe_psnr"])  # its floors and probe; the codes are drawn here
    codes = np.random.default_rng(args.seed).integers(0, 2, (args.codes, model.fingerprint_bits), dtype=np.uint8)
    passed = np.array([screen.passes(*screen.read(code)) for code in codes])
    if not passed.any():
        print("no code passed the floors")
        return
    share = codes[passed].mean(axis=0)
    print(f"{passed.sum()} of {args.codes} codes pass; per-bit share of 1s among them: {share.min():.2f}-"
          f"{share.max():.2f}, sd {share.std():.3f} (a fair coin's sampling sd {0.5 / np.sqrt(passed.sum()):.3f})")
    print(np.round(np.sort(share), 2))


if __name__ == "__main__":
    exit_on_user_error(main)
