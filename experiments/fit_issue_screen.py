"""Record the code-screening floors in a saved pnm checkpoint (issue 11).

Training now fits them after its last step (``method.issue_screen`` in ``conf/method/pnm.yaml``;
``fingerprint_lm/distributor/screening.py: fit_floors``) and records them in ``fingerprint.json``
as ``issue_screen``, which ``task=issue`` screens codes with. A pnm checkpoint written before
2026-12-06 (afternoon) has none; this runs the same fit with pnm.yaml's settings and rewrites only
``fingerprint.json`` (plus a ``made_by`` line) and ``SHA256SUMS``; the weights keep their bytes.
The shipped pnm checkpoint got its floors this way:

    python experiments/fit_issue_screen.py fingerprint_lm/assets/embedded_pnm

A checkpoint that already records floors is refused (``--refit`` replaces them).

``--rate-only`` keeps the recorded floors and measures only their pass rate, on ``--rate-candidates``
random codes other than those the floor was fitted on (what ``fit_floors`` records since 2026-12-06
evening; before, the rate was the fitted codes' own share, ``keep`` by construction). The shipped
checkpoint's rate was measured this way:

    python experiments/fit_issue_screen.py fingerprint_lm/assets/embedded_pnm --rate-only --rate-candidates 512

``--predictor`` keeps the recorded floors and fits the read predictor ``distributor.screen_by=predicted``
screens with (``fingerprint_lm/distributor/read_predictor.py``; ``--predictor-codes`` probe reads,
replacing any predictor recorded); its weights join ``fingerprint.safetensors``, its record
``issue_screen.predictor``. The shipped checkpoint's:

    python experiments/fit_issue_screen.py fingerprint_lm/assets/embedded_pnm --predictor --predictor-codes 3000
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from omegaconf import OmegaConf

from fingerprint_lm.distributor.read_predictor import FOLDS, with_read_predictor
from fingerprint_lm.distributor.screening import ProbeReader, estimate_pass_rate, fit_floors
from fingerprint_lm.errors import ConfigError, check_int, exit_on_user_error
from fingerprint_lm.models.checkpoint import load_fingerprint_model, rewrite_private_state
from fingerprint_lm.tasks.compose import method_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--refit", action="store_true", help="replace the floors the checkpoint records")
    parser.add_argument("--rate-only", action="store_true", help="keep the recorded floors; measure their pass rate")
    parser.add_argument("--rate-candidates", type=int, default=None,
                        help="codes the pass rate is measured on (default: pnm.yaml's, else fit_floors')")
    parser.add_argument("--predictor", action="store_true", help="keep the recorded floors; fit the read predictor")
    parser.add_argument("--predictor-codes", type=int, default=3000, help="probe reads the predictor is fitted on")
    args = parser.parse_args()
    if sum((args.refit, args.rate_only, args.predictor)) > 1:
        raise ConfigError("--refit fits new floors, --rate-only and --predictor keep the recorded ones: "
                          "give one of them")
    check_int("--predictor-codes", args.predictor_codes, 2 * FOLDS)
    model = load_fingerprint_model(args.checkpoint)
    if model.method != "pnm":
        raise ConfigError(f"{args.checkpoint} is a method={model.method} checkpoint; the floors are pnm's")
    if model.meta.get("issue_screen") is not None and not (args.refit or args.rate_only or args.predictor):
        raise ConfigError(f"{args.checkpoint} already records issue_screen {model.meta['issue_screen']} (--refit)")
    settings = OmegaConf.to_container(method_config("pnm").issue_screen)
    if args.rate_candidates is not None:
        settings["rate_candidates"] = check_int("--rate-candidates", args.rate_candidates)
    started = time.time()
    if args.rate_only:
        floors = rate_only(model, args.checkpoint, settings.get("rate_candidates", 128))
    elif args.predictor:
        floors = with_predictor(model, args.checkpoint, args.predictor_codes)
    else:
        floors = fit_floors(model, **settings)
        model.issue_predictor = {}  # fitted to the floors replaced: refit it with --predictor
    model.meta["issue_screen"] = floors
    flags = "".join(f" {flag}" for flag, on in (("--refit", args.refit), ("--rate-only", args.rate_only),
                                                ("--predictor", args.predictor)) if on)
    flags += "" if args.rate_candidates is None else f" --rate-candidates {args.rate_candidates}"
    flags += f" --predictor-codes {args.predictor_codes}" if args.predictor else ""
    what = (f"the recorded floors' pass rate on {floors['pass_rate_codes']} other codes" if args.rate_only else
            f"the read predictor on {args.predictor_codes} codes' probe reads" if args.predictor else
            f"what training now fits; pnm.yaml's keep {settings['keep']}, min_psnr {settings['min_psnr']}")
    model.meta.setdefault("made_by", []).append(
        f"issue_screen: python experiments/fit_issue_screen.py {args.checkpoint}{flags} ({what})")
    rewrite_private_state(model, args.checkpoint)
    print(f"{args.checkpoint}: issue_screen {floors} ({time.time() - started:.0f} s)")


def rate_only(model, checkpoint: Path, codes: int) -> dict:
    """The recorded floors with their pass rate measured anew on ``codes`` codes the floor was not
    fitted on (seed: the fit's + 1, as ``fit_floors`` draws them)."""
    recorded = model.meta.get("issue_screen")
    if not recorded or recorded.get("min_probe_bit_acc") is None:
        raise ConfigError(f"{checkpoint} records no floors to measure (fit them first, without --rate-only)")
    reader = ProbeReader(model, int(recorded.get("probe_images", 64)))
    rate = estimate_pass_rate(reader, recorded["min_probe_bit_acc"], recorded["min_probe_psnr"], codes,
                              int(recorded.get("seed", 7)) + 1)
    print(f"pass rate {recorded.get('pass_rate')} (fitted codes' own share) -> {rate['pass_rate']} "
          f"+- {rate['pass_rate_stderr']} on {codes} other codes")
    return {**recorded, **rate}


def with_predictor(model, checkpoint: Path, codes: int) -> dict:
    """The recorded floors with a read predictor fitted to them (its weights set on ``model``)."""
    recorded = model.meta.get("issue_screen")
    if not recorded or recorded.get("min_probe_bit_acc") is None:
        raise ConfigError(f"{checkpoint} records no floors for a predictor to follow (fit them first)")
    floors = with_read_predictor(model, recorded, codes)
    print(f"read predictor: {floors['predictor']}")
    return floors


if __name__ == "__main__":
    exit_on_user_error(main)
