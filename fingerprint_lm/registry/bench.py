"""Registry speed figures: identification among 10^6 users, registering 10^4 users.

Run ``python -m fingerprint_lm.registry.bench``. Targets: < 50 ms per identification query among
10^6 48-bit codes; < 10 s to register 10^4 users into a fresh SQLite registry.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from fingerprint_lm.registry.codes import draw_codes_min_distance, pack_bits
from fingerprint_lm.registry.index import CodeIndex
from fingerprint_lm.registry.soft import soft_identify
from fingerprint_lm.registry.store import Registry
from fingerprint_lm.registry.tracing import trace


def bench_registry(
    n_index: int = 1_000_000,
    k: int = 48,
    n_queries: int = 20,
    n_register: int = 10_000,
    min_distances: tuple[int, ...] = (0, 8),
    seed: int = 0,
) -> dict:
    """Measure identification and registration speed; returns a flat dict of figures.

    Keys: ``identify_ms_median``, ``identify_nearest_correct``/``identify_accused_correct`` (queries
    are registered codes with 5% of bits flipped) (one :meth:`CodeIndex.identify` among ``n_index`` random codes,
    median of ``n_queries``), ``identify_many_ms_per_query``, ``soft_identify_ms_median`` and
    ``soft_identify_unmarked_ms_median`` (:func:`soft_identify` of one image's logits: the noisy
    codes' signs with random confidence, and pure noise), ``trace_ms`` (one :func:`trace` over
    the same index, 16 images), and ``register_s_min_distance_<d>`` (``register_many`` of
    ``n_register`` users into a fresh file, codes drawn beforehand at that distance) plus
    ``draw_s_min_distance_<d>`` (drawing those codes).
    """
    rng = np.random.default_rng(seed)
    out: dict = {"n_index": n_index, "k": k, "n_register": n_register}

    bits = rng.integers(0, 2, size=(n_index, k), dtype=np.uint8)
    index = CodeIndex([f"u{i}" for i in range(n_index)], pack_bits(bits), k)
    targets = rng.integers(0, n_index, size=n_queries)
    queries = bits[targets].copy()
    flips = rng.random(queries.shape) < 0.05
    queries[flips] ^= 1
    times, nearest, accused = [], 0, 0
    for q, t in zip(queries, targets):
        t0 = time.perf_counter()
        res = index.identify(q, fpr=1e-6)
        times.append(time.perf_counter() - t0)
        nearest += res["nearest_user_id"] == f"u{t}"
        accused += res["user_id"] == f"u{t}"
    out["identify_ms_median"] = 1e3 * float(np.median(times))
    # queries are the target's code with 5% of bits flipped: how often it is nearest / accused
    out["identify_nearest_correct"] = f"{nearest}/{n_queries}"
    out["identify_accused_correct"] = f"{accused}/{n_queries}"
    t0 = time.perf_counter()
    index.identify_many(queries, fpr=1e-6)
    out["identify_many_ms_per_query"] = 1e3 * (time.perf_counter() - t0) / n_queries
    # Soft decoding (the distributor's default): logits with the noisy codes' signs and random
    # confidence, and pure-noise logits (an unmarked image: nobody reaches the threshold).
    marked = (2.0 * queries - 1.0) * rng.exponential(1.0, queries.shape)
    for name, rows in (("soft_identify", marked), ("soft_identify_unmarked", rng.standard_normal(queries.shape))):
        times, accused = [], 0
        for row, t in zip(rows, targets):
            t0 = time.perf_counter()
            res = soft_identify(row[None], index, fpr=1e-6)[0]
            times.append(time.perf_counter() - t0)
            accused += res["user_id"] == f"u{t}"
        out[f"{name}_ms_median"] = 1e3 * float(np.median(times))
        out[f"{name}_accused_correct"] = f"{accused}/{n_queries}"
    probs = np.clip(bits[targets[:2]].mean(axis=0) + rng.normal(0, 0.2, size=(16, k)), 0, 1)
    t0 = time.perf_counter()
    trace(probs, index, fpr=1e-6)
    out["trace_ms"] = 1e3 * (time.perf_counter() - t0)
    del bits, index

    with tempfile.TemporaryDirectory() as tmp:
        for d in min_distances:
            t0 = time.perf_counter()
            codes = draw_codes_min_distance(n_register, k, d, rng)
            out[f"draw_s_min_distance_{d}"] = time.perf_counter() - t0
            reg = Registry(Path(tmp) / f"reg{d}.sqlite", k, min_distance=d)
            rows = [(f"user{i:05d}", codes[i], None, "perm") for i in range(n_register)]
            t0 = time.perf_counter()
            reg.register_many(rows)
            out[f"register_s_min_distance_{d}"] = time.perf_counter() - t0
            assert len(reg) == n_register
            reg.close()
    return out


if __name__ == "__main__":
    for key, value in bench_registry().items():
        print(f"{key:32s} {value:.3f}" if isinstance(value, float) else f"{key:32s} {value}")
