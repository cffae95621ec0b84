"""``make bench``: speed figures of the embedded default on this machine (printed, not asserted).

Training step K=0 vs K=1 (the worst-case term's cost), extractor and PNM-decoder throughput,
and the distributor's figures (registry search, registration, issuing a copy) when available.

``--sd`` adds one worst-case training step (K=1, batch 1) of a PNM on a randomly initialised
decoder of Stable Diffusion 1/2's size (128/256/512/512, 49M parameters), with and without
gradient checkpointing: seconds per step and peak memory (CUDA: peak allocated, bf16 autocast;
CPU: peak resident set of a fresh process, float32). It is behind a flag because on a CPU it is
slow: measured here (2 shared cores, 1 thread), ~20 s per step at 64 px, about 3 minutes in all.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import resource
import statistics
import time

import torch

from fingerprint_lm.distributor.bench import bench_distributor
from fingerprint_lm.lit.fingerprinting import FingerprintModule
from fingerprint_lm.models.extractor import FingerprintExtractor
from fingerprint_lm.models.pnm import PersonalizedDecoder
from fingerprint_lm.models.vae import SD_VAE_CONFIG, build_vae
from fingerprint_lm.registry.bench import bench_registry


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
    return _manual(FingerprintModule(vae, PersonalizedDecoder(vae.decoder, bits), FingerprintExtractor(bits),
                                     wc_steps=wc_steps))


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


def _sd_training_step(resolution: int, batch_size: int, bits: int, checkpointing: bool, repeats: int,
                      threads: int | None) -> dict[str, float]:
    """One configuration of ``bench_sd_training``, run in a fresh process (clean peak memory)."""
    if threads:
        torch.set_num_threads(threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    vae = build_vae(SD_VAE_CONFIG)
    pnm = PersonalizedDecoder(vae.decoder, bits, post_quant_conv=vae.post_quant_conv,
                              gradient_checkpointing=checkpointing)
    module = _manual(FingerprintModule(vae, pnm, FingerprintExtractor(bits), wc_steps=1)).to(device)
    images = torch.rand(batch_size, 3, resolution, resolution, device=device) * 2 - 1

    def step():
        # bf16 autocast where it pays (CUDA); a CPU without bf16 units is slower in bf16 than fp32
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            module.training_step({"image": images}, 0)
        if device.type == "cuda":
            torch.cuda.synchronize()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = _median_seconds(step, repeats, warmup=1)
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    return {"seconds": seconds, "peak_mb": peak_mb}


def bench_sd_training(resolution: int | None = None, batch_size: int = 1, bits: int = 48, repeats: int = 1,
                      threads: int | None = None) -> dict[str, float]:
    """Seconds per worst-case training step and peak memory of a PNM on an SD-sized decoder,
    without and with gradient checkpointing (each in its own process)."""
    resolution = resolution or (256 if torch.cuda.is_available() else 64)
    out: dict[str, float] = {}
    context = multiprocessing.get_context("spawn")
    for checkpointing in (False, True):
        with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
            result = pool.submit(_sd_training_step, resolution, batch_size, bits, checkpointing, repeats,
                                 threads).result()
        tag = f"sd_{resolution}px_b{batch_size}_{'ckpt' if checkpointing else 'plain'}"
        out[f"{tag}_train_step_s"] = result["seconds"]
        out[f"{tag}_peak_mb"] = result["peak_mb"]
    return out


def _manual(module: FingerprintModule) -> FingerprintModule:
    """Let ``training_step`` run outside a Trainer (optimizer, backward and logging stubs)."""
    optimizer = module.configure_optimizers()
    module.optimizers = lambda: optimizer
    module.manual_backward = lambda loss: loss.backward()
    module.log_dict = lambda *a, **k: None
    module.log = lambda *a, **k: None
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--sd", action="store_true",
                        help="also time a training step on an SD-sized decoder (slow on a CPU: minutes)")
    parser.add_argument("--sd-only", action="store_true", help="only the SD-sized figure")
    parser.add_argument("--sd-resolution", type=int, default=None, help="SD image side (default: 256 CUDA, 64 CPU)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# fingerprint_lm bench: torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    if args.sd or args.sd_only:
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU, float32"
        print(f"# SD-sized decoder (128/256/512/512), random init, batch 1, K=1 worst-case step, {device}")
    if args.sd_only:
        _print(bench_sd_training(args.sd_resolution, threads=args.threads))
        return
    print("# embedded default: tiny AutoencoderKL (16/32/64), 32x32 images, 48-bit fingerprints")
    results: dict[str, float] = {}
    results.update(bench_training())
    results.update(bench_inference())
    results.update(bench_registry())
    results.update(bench_distributor())
    if args.sd:
        results.update(bench_sd_training(args.sd_resolution, threads=args.threads))
    _print(results)


def _print(results: dict[str, float]) -> None:
    width = max(len(k) for k in results)
    for key, value in results.items():
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        print(f"{key:<{width}}  {shown}")


if __name__ == "__main__":
    main()
