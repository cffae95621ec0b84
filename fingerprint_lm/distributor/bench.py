"""Distributor speed figures: issuing one copy on the embedded default.

Run ``python -m fingerprint_lm.distributor.bench``. Target: < 50 ms to compute one copy (the user's
PNM coefficients, ACT, bias map; the base weights already in memory). Writing the files, hashing
them and registering the user are reported separately, and so is a whole issue with the code
screened as ``task=issue`` screens it by default (``distributor/issue_screens.py``: the checkpoint's read
predictor where it records one, else the probe; :func:`screened_pnm_issue` times each screen). The default
method's shipped checkpoint (``embedded_pnm``) is used when it exists; otherwise a tiny-default VAE
with a 48-bit PNM of random (untrained) heads and no screening.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from fingerprint_lm.distributor.copies import issue_copy, personal_tensors, write_copy
from fingerprint_lm.distributor.issue_screens import UniformCodes, choose_screen, make_screen
from fingerprint_lm.distributor.screening import ProbeReader
from fingerprint_lm.errors import CheckpointError
from fingerprint_lm.models.act import derive_act_seed
from fingerprint_lm.models.checkpoint import (
    FingerprintModel,
    build_fingerprint_model,
    load_fingerprint_model,
    shipped_checkpoint,
)
from fingerprint_lm.models.vae import build_vae
from fingerprint_lm.registry.store import Registry


def _default_model(fingerprint_bits: int = 48) -> tuple[FingerprintModel, str]:
    try:
        return load_fingerprint_model(shipped_checkpoint("embedded_pnm")), "shipped pnm checkpoint"
    except CheckpointError:
        torch.manual_seed(0)
        model = build_fingerprint_model(build_vae(), fingerprint_bits, {}, {})
        with torch.no_grad():
            for head in model.pnm.affine_heads.values():
                head.weight.normal_(0, 0.01)
        model.vae.eval()
        return model, "tiny default, untrained PNM"


def bench_distributor(repeats: int = 20, act_type: str = "all") -> dict:
    """Median seconds of each step of issuing a copy; returns a flat dict of figures.

    Keys: ``issue_compute_ms`` (code -> copy tensors: mapping network, affine coefficients, ACT,
    bias map), ``issue_write_ms`` (safetensors files + hash, atomic), ``issue_total_ms`` (one
    :func:`issue_copy`: code drawn, computed, written, registered into a fresh registry),
    ``issue_<screen>_screened_total_ms`` (mean) and ``<screen>_screen_draws_mean`` (the same with the
    code screened as ``task=issue`` screens it by default, ``distributor/issue_screens.py``: by the
    checkpoint's read predictor where it records one, else on the probe, the reader built once),
    ``copy_mib`` and ``model``.
    """
    model, source = _default_model()
    k = model.fingerprint_bits
    rng = np.random.default_rng(0)
    secret = b"bench-secret"
    out: dict = {"model": source, "fingerprint_bits": k, "act_type": act_type}

    def compute(i: int):
        code = rng.integers(0, 2, k, dtype=np.uint8)
        return personal_tensors(model, code, act_type, derive_act_seed(secret, f"u{i}"))

    for i in range(2):  # warm-up
        compute(i)
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        compute(i)
        times.append(time.perf_counter() - start)
    out["issue_compute_ms"] = 1e3 * statistics.median(times)

    state, bias_map, site = compute(0)
    with tempfile.TemporaryDirectory() as tmp:
        times = []
        for i in range(repeats):
            start = time.perf_counter()
            write_copy(Path(tmp) / f"w{i}", model.vae.config, state, bias_map, site)
            times.append(time.perf_counter() - start)
        out["issue_write_ms"] = 1e3 * statistics.median(times)
        out["copy_mib"] = sum(f.stat().st_size for f in (Path(tmp) / "w0").iterdir()) / 2**20

        with Registry(Path(tmp) / "registry.sqlite", k, min_distance=8) as registry:
            times = []
            for i in range(repeats):
                start = time.perf_counter()
                issue_copy(model, registry, f"user{i}", Path(tmp) / "copies", secret, act_type, rng=rng)
                times.append(time.perf_counter() - start)
            out["issue_total_ms"] = 1e3 * statistics.median(times)
            kind = choose_screen(model)  # task=issue's default screen (screen_by=auto)
            if kind is not None:
                out.update(_screened_issues(make_screen(kind, model, registry), kind, model, registry,
                                            Path(tmp) / "copies", secret, act_type, rng, repeats))
    return out


def _screened_issues(screen, kind: str, model, registry, copies: Path, secret: bytes, act_type: str,
                     rng: np.random.Generator, repeats: int) -> dict:
    times, draws = [], []
    for i in range(repeats):
        start = time.perf_counter()
        issue_copy(model, registry, f"screened{i}", copies, secret, act_type, rng=rng, draw_code=screen)
        times.append(time.perf_counter() - start)
        draws.append(screen.draws)
    # a mean, not a median: the draws per copy vary, and a distributor pays their sum
    return {f"issue_{kind}_screened_total_ms": 1e3 * statistics.fmean(times),
            f"{kind}_screen_draws_mean": float(np.mean(draws))}


def screened_pnm_issue(repeats: int, screen_by: str = "probe") -> dict[str, float]:
    """A pnm copy as ``task=issue`` makes it: codes drawn (from an empty registry) until one clears
    the shipped checkpoint's recorded floors on the probe (``distributor/screening.py``; the probe
    reader built once, as a distributor issuing many copies builds it), or, ``screen_by="predicted"``,
    until its read predictor keeps one (``distributor/read_predictor.py``: nothing decoded), then the
    copy's tensors; nothing is written or registered."""
    model = load_fingerprint_model(shipped_checkpoint("embedded_pnm"))
    rng, draws = np.random.default_rng(1), []
    with tempfile.TemporaryDirectory() as tmp, Registry(Path(tmp) / "registry.sqlite", model.fingerprint_bits) as reg:
        screen = make_screen(screen_by, model, reg)  # the screen task=issue builds for that screen_by

        def issue():
            code = screen(rng)
            draws.append(screen.draws)
            return personal_tensors(model, code, "all", int(rng.integers(2**31)))

        issue()  # warm-up
        start = time.perf_counter()
        for _ in range(repeats):
            issue()
        seconds = (time.perf_counter() - start) / repeats  # a mean: the draws per copy vary, and cost adds up
    name = "screened" if screen_by == "probe" else screen_by
    return {f"issue_copy_pnm_{name}_s": seconds, f"pnm_{name}_draws_mean": float(np.mean(draws[-repeats:]))}


def predicted_screen_cost(repeats: int = 200) -> dict[str, float]:
    """Seconds a predicted screen takes to keep one code of the shipped checkpoint (draws included;
    the same at any decoder size: it reads only the code) and the probe reads its fit took."""
    model = load_fingerprint_model(shipped_checkpoint("embedded_pnm"))
    screen, rng = make_screen("predicted", model, UniformCodes(model.fingerprint_bits)), np.random.default_rng(2)
    screen(rng)  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        screen(rng)
    return {"predicted_screen_s": (time.perf_counter() - start) / repeats,
            "predictor_fit_codes": screen.record["fit_codes"]}


def probe_read_cost(model: FingerprintModel, sizes: tuple[int, int] = (2, 6), seed: int = 0) -> dict:
    """What one screening draw costs on ``model``: a fresh code's probe read (its decoder built,
    the probe decoded and read; :class:`~fingerprint_lm.distributor.screening.ProbeReader`) timed
    at two probe sizes after an untimed warm-up, split into ``probe_fixed_s`` and
    ``probe_per_image_s``. For decoders where 64 probe images take minutes (the SD-sized one)."""
    rng = np.random.default_rng(seed)
    timed = {}
    for size in sizes:
        reader = ProbeReader(model, size)
        if not timed:
            reader(rng.integers(0, 2, model.fingerprint_bits, dtype=np.uint8))  # first-call costs, untimed
        start = time.perf_counter()
        reader(rng.integers(0, 2, model.fingerprint_bits, dtype=np.uint8))
        timed[size] = time.perf_counter() - start
    (small, large) = sizes
    per_image = (timed[large] - timed[small]) / (large - small)
    return {"probe_sizes_timed": list(sizes), "probe_read_s_timed": [timed[small], timed[large]],
            "probe_per_image_s": per_image, "probe_fixed_s": timed[small] - small * per_image}


if __name__ == "__main__":
    torch.set_num_threads(1)
    for key, value in bench_distributor().items():
        print(f"{key:24s} {value:.3f}" if isinstance(value, float) else f"{key:24s} {value}")
