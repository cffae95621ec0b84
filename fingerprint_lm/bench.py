"""``make bench``: speed figures of the embedded default on this machine (printed, not asserted).

Training step K=0 vs K=1 (the worst-case term's cost), extractor and PNM-decoder throughput,
and the distributor's figures (registry search, registration, issuing a copy) when available.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fingerprint_lm.lit.fingerprinting import FingerprintModule
from fingerprint_lm.models.extractor import FingerprintExtractor
from fingerprint_lm.models.pnm import PersonalizedDecoder
from fingerprint_lm.models.vae import build_vae


def _median_seconds(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _module(wc_steps: int, bits: int) -> FingerprintModule:
    torch.manual_seed(0)
    vae = build_vae()
    module = FingerprintModule(vae, PersonalizedDecoder(vae.decoder, bits), FingerprintExtractor(bits), wc_steps=wc_steps)
    optimizer = module.configure_optimizers()
    module.optimizers = lambda: optimizer
    module.manual_backward = lambda loss: loss.backward()
    module.log_dict = lambda *a, **k: None
    module.log = lambda *a, **k: None
    return module


def bench_training(batch_size: int = 32, bits: int = 48, repeats: int = 10) -> dict[str, float]:
    images = torch.rand(batch_size, 3, 32, 32) * 2 - 1
    out = {}
    for k in (0, 1):
        module = _module(k, bits)
        out[f"train_step_K{k}_s"] = _median_seconds(lambda m=module: m.training_step({"image": images}, 0), repeats)
    out["worst_case_cost_ratio"] = out["train_step_K1_s"] / out["train_step_K0_s"]
    return out


@torch.no_grad()
def bench_inference(batch_size: int = 64, bits: int = 48, repeats: int = 10) -> dict[str, float]:
    torch.manual_seed(0)
    vae = build_vae()
    pnm = PersonalizedDecoder(vae.decoder, bits).eval()
    extractor = FingerprintExtractor(bits).eval()
    latents = torch.randn(batch_size, 4, 8, 8)
    codes = torch.randint(0, 2, (batch_size, bits))
    images = torch.rand(batch_size, 3, 32, 32) * 2 - 1
    return {
        "extractor_images_per_s": batch_size / _median_seconds(lambda: extractor(images), repeats),
        "pnm_decoder_images_per_s": batch_size / _median_seconds(lambda: pnm(latents, codes), repeats),
        "base_decoder_images_per_s": batch_size / _median_seconds(lambda: pnm(latents, None), repeats),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# fingerprint_lm bench: torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    print("# embedded default: tiny AutoencoderKL (16/32/64), 32x32 images, 48-bit fingerprints")
    results: dict[str, float] = {}
    results.update(bench_training())
    results.update(bench_inference())
    try:
        from fingerprint_lm.registry.bench import bench_registry

        results.update(bench_registry())
    except ImportError as exc:  # pragma: no cover - optional part
        print(f"# registry bench unavailable: {exc}")
    try:
        from fingerprint_lm.distributor.bench import bench_distributor

        results.update(bench_distributor())
    except ImportError:
        print("# distributor bench unavailable")
    width = max(len(k) for k in results)
    for key, value in results.items():
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        print(f"{key:<{width}}  {shown}")


if __name__ == "__main__":
    main()
