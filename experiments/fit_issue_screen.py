"""Record the code-screening floors in a saved pnm checkpoint (issue 11).

Training now fits them after its last step (``method.issue_screen`` in ``conf/method/pnm.yaml``;
``fingerprint_lm/distributor/screening.py: fit_floors``) and records them in ``fingerprint.json``
as ``issue_screen``, which ``task=issue`` screens codes with. A pnm checkpoint written before
2026-12-06 (afternoon) has none; this runs the same fit with pnm.yaml's settings and rewrites only
``fingerprint.json`` (plus a ``made_by`` line) and ``SHA256SUMS``; the weights keep their bytes.
The shipped pnm checkpoint got its floors this way:

    python experiments/fit_issue_screen.py fingerprint_lm/assets/embedded_pnm

A checkpoint that already records floors is refused (``--refit`` replaces them).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from omegaconf import OmegaConf

from fingerprint_lm.distributor.screening import fit_floors
from fingerprint_lm.errors import ConfigError, exit_on_user_error
from fingerprint_lm.models.checkpoint import load_fingerprint_model, rewrite_private_state

PNM_YAML = Path(__file__).resolve().parents[1] / "conf" / "method" / "pnm.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--refit", action="store_true", help="replace the floors the checkpoint records")
    args = parser.parse_args()
    model = load_fingerprint_model(args.checkpoint)
    if model.method != "pnm":
        raise ConfigError(f"{args.checkpoint} is a method={model.method} checkpoint; the floors are pnm's")
    if model.meta.get("issue_screen") is not None and not args.refit:
        raise ConfigError(f"{args.checkpoint} already records issue_screen {model.meta['issue_screen']} (--refit)")
    settings = OmegaConf.to_container(OmegaConf.load(PNM_YAML).issue_screen)
    started = time.time()
    floors = fit_floors(model, **settings)
    model.meta["issue_screen"] = floors
    model.meta.setdefault("made_by", []).append(
        f"issue_screen: python experiments/fit_issue_screen.py {args.checkpoint}{' --refit' if args.refit else ''} "
        f"(what training now fits; pnm.yaml's keep {settings['keep']}, min_psnr {settings['min_psnr']})")
    rewrite_private_state(model, args.checkpoint)
    print(f"{args.checkpoint}: issue_screen {floors} ({time.time() - started:.0f} s)")


if __name__ == "__main__":
    exit_on_user_error(main)
