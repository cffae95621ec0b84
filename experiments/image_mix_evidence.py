"""Which evidence names the colluders of the sweep's ``image_mix_c3`` point (issue 13).

    python experiments/image_mix_evidence.py [--method carrier|pnm]

Re-runs the point (shipped checkpoint, ACT all, 256 images, 1000 innocents, seed 0) with the
sweep's own evaluation, then traces its images: pooled scores alone (the old ``trace``, at fpr/2
as in the combined test) and both kinds of evidence (``trace_evidence`` at fpr 1e-3), the
per-image part with soft decoding (the default) and with hard decoding. Prints the top suspects
of each.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from fingerprint_lm.errors import exit_on_user_error
from fingerprint_lm.evaluation.collusion import Point, PointSettings, evaluate_point
from fingerprint_lm.models import batched
from fingerprint_lm.models.checkpoint import load_fingerprint_model, shipped_checkpoint
from fingerprint_lm.registry.tracing import trace, trace_evidence


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=["carrier", "pnm"], default="carrier")
    args = parser.parse_args()
    model = load_fingerprint_model(shipped_checkpoint("embedded" if args.method == "carrier" else "embedded_pnm"))
    settings, point = (PointSettings(n_images=256, n_innocents=1000, tracing_fpr=1e-3),
                       Point("all", "image_mix", None, 3))
    torch.manual_seed(0)
    result = evaluate_point(model, point, settings, 0)
    users = result.users
    logits = batched.extract(model.extractor, result.images.outputs).double().numpy()
    probs = 1.0 / (1.0 + np.exp(-logits))
    print("pooled scores alone (fpr 5e-4):")
    for s in trace(probs, users.index, fpr=5e-4, top=4):
        print(f"  {s['user_id']:>12} score {s['score']:.2f} accused {s['accused']}")
    for decoding in ("soft", "hard"):
        both = trace_evidence(probs, users.index, fpr=1e-3, top=4, logits=logits, decoding=decoding)
        print(f"both kinds of evidence, {decoding} per-image decoding "
              f"(fpr 1e-3, pooled threshold {both['threshold']:.2f}):")
        for s in both["suspects"][:4]:
            print(f"  {s['user_id']:>12} images {s['n_images']:3d} score {s['score']:.2f} evidence {s['evidence']}")


if __name__ == "__main__":
    exit_on_user_error(main)
