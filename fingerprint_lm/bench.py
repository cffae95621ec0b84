"""``make bench``: speed and memory figures of the embedded default, written to ``BENCHMARKS.md``.

Every section runs in a fresh process (its peak resident memory is its own) and the ratios are
measured side by side in one run: the worst-case training step against a plain one (per ascent
variant), issuing one copy per method (pnm against stable_signature, which trains each copy, and
wouaf; at the tiny size and at SD's decoder size), identification among 10^6 registered users,
extractor and decoder throughput, the CLI's
start-up, and (``--sweep``) the README's default collusion sweep cold and warm. ``--sd`` adds one
worst-case step of a PNM on an SD-sized decoder (bf16 on CUDA; on a CPU, float32 and minutes).

    python -m fingerprint_lm.bench [--sweep] [--sd] [--write BENCHMARKS.md] [--threads N]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from fingerprint_lm.bench_sd import issue_cost_sd
from fingerprint_lm.distributor.bench import bench_distributor, screened_pnm_issue
from fingerprint_lm.lit.fingerprinting import FingerprintModule
from fingerprint_lm.methods import personal_tensors
from fingerprint_lm.models.checkpoint import (
    load_fingerprint_model,
    shipped_checkpoint,
)
from fingerprint_lm.models.extractor import FingerprintExtractor
from fingerprint_lm.models.pnm import PersonalizedDecoder
from fingerprint_lm.models.vae import SD_VAE_CONFIG, build_vae
from fingerprint_lm.registry.bench import bench_registry
from fingerprint_lm.report.text_tables import markdown_lines
from fingerprint_lm.storage import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
SWEEP_COMMAND = [sys.executable, "-m", "fingerprint_lm", "+experiment=collusion_sweep"]
# The ascent variants of the worst-case step (lit/fingerprinting.py, experiments/worst_case_cost.py).
WORST_CASE_VARIANTS: dict[str, dict] = {
    "K1_exact": {"wc_ascent": "exact"},
    "K1_reuse": {"wc_ascent": "reuse"},
    "K1_lagged": {"wc_ascent": "lagged"},
    "K1_exact_every2": {"wc_ascent": "exact", "wc_every": 2},
}


def _mean_seconds(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    """Mean, not median: a step that alternates cheap and dear (every 2nd) must count both."""
    for _ in range(warmup):
        fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def manual_stepping(module: FingerprintModule) -> FingerprintModule:
    """Let ``training_step`` run outside a Trainer (optimizer, backward and logging stubs)."""
    optimizer = module.configure_optimizers()
    module.optimizers = lambda: optimizer
    module.manual_backward = lambda loss: loss.backward()
    module.log_dict = lambda *a, **k: None
    module.log = lambda *a, **k: None
    return module


def _interleaved_mean_seconds(steps: dict[str, Callable[[], object]], repeats: int, block: int = 2,
                              warmup: int = 2) -> dict[str, float]:
    """Mean seconds per call of each function, timed in alternating blocks of ``block`` calls.

    Timing one variant after another lets the machine's speed drift between them (on a shared
    2-core machine the plain step, the ratios' denominator, read 0.128 s in one run and 0.154 s in
    the next); round-robin blocks spread any drift over every variant alike. A block of 2 keeps a
    step that alternates cheap and dear (every 2nd) counted on both."""
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    totals = dict.fromkeys(steps, 0.0)
    rounds = max(1, repeats // block)
    for _ in range(rounds):
        for name, fn in steps.items():
            start = time.perf_counter()
            for _ in range(block):
                fn()
            totals[name] += time.perf_counter() - start
    return {name: total / (rounds * block) for name, total in totals.items()}


def bench_training(batch_size: int = 32, bits: int = 48, repeats: int = 20) -> dict[str, float]:
    """Seconds per training step: plain (K=0) and each worst-case variant, timed interleaved;
    ratios to plain."""
    images = torch.rand(batch_size, 3, 32, 32) * 2 - 1
    steps: dict[str, Callable[[], object]] = {}
    for name, options in {"K0_plain": {"wc_steps": 0}, **WORST_CASE_VARIANTS}.items():
        torch.manual_seed(0)
        vae = build_vae()
        module = manual_stepping(FingerprintModule(vae, PersonalizedDecoder(vae.decoder, bits),
                                                   FingerprintExtractor(bits), **options))
        steps[name] = lambda m=module: m.training_step({"image": images}, 0)
    seconds = _interleaved_mean_seconds(steps, repeats)
    out = {f"train_step_{name}_s": value for name, value in seconds.items()}
    for name in WORST_CASE_VARIANTS:
        out[f"worst_case_ratio_{name}"] = out[f"train_step_{name}_s"] / out["train_step_K0_plain_s"]
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
        "extractor_images_per_s": batch_size / _mean_seconds(lambda: extractor(images), repeats),
        "pnm_decoder_images_per_s": batch_size / _mean_seconds(lambda: pnm(latents, codes), repeats),
        "base_decoder_images_per_s": batch_size / _mean_seconds(lambda: pnm(latents, None), repeats),
        **_shipped_reader_throughput(images, repeats),
    }


def _shipped_reader_throughput(images: torch.Tensor, repeats: int) -> dict[str, float]:
    """Images a second read by the shipped pnm checkpoint's readers: the band reader training uses,
    and the content reader attribution and tracing use (each image also encoded and decoded by the
    base VAE, so it costs about a base VAE round trip)."""
    model = load_fingerprint_model(shipped_checkpoint("embedded_pnm"))
    model.extractor.eval()
    readers = {"pnm_band_reader": model.extractor}
    if model.content_reader is not None:
        readers["pnm_content_reader"] = model.content_reader.eval()
    return {f"{name}_images_per_s": len(images) / _mean_seconds(lambda r=reader: r(images), repeats)
            for name, reader in readers.items()}


def _method_models() -> dict[str, object]:
    """A 48-bit model of each method: the shipped checkpoints; stable_signature is the pnm
    checkpoint's base VAE and reader with the per-copy recipe's defaults (the sweep builds it on the
    base VAE with the fixed bank instead: the same decoder size, so the same cost per copy)."""
    models = {name: load_fingerprint_model(shipped_checkpoint(folder))
              for name, folder in (("carrier", "embedded"), ("pnm", "embedded_pnm"), ("wouaf", "embedded_wouaf"))}
    signature = load_fingerprint_model(shipped_checkpoint("embedded_pnm"))
    signature.meta = {**signature.meta, "method": "stable_signature", "copy_finetune": {}}
    models["stable_signature"] = signature
    return models


def bench_issue_methods(repeats: int = 20, slow_repeats: int = 2) -> dict[str, float]:
    """Seconds to compute one copy (code -> the copy's tensors, ACT all) per method, and the ratio
    of stable_signature's (a training run per copy) to pnm's and wouaf's."""
    rng = np.random.default_rng(0)
    out: dict[str, float] = {}
    for name, model in _method_models().items():
        n = slow_repeats if name == "stable_signature" else repeats

        def issue(model=model):  # a new code each time: no memoised copy
            return personal_tensors(model, rng.integers(0, 2, 48, dtype=np.uint8), "all", int(rng.integers(2**31)))

        out[f"issue_copy_{name}_s"] = _mean_seconds(issue, n, warmup=1 if n == slow_repeats else 2)
    out.update({**screened_pnm_issue(repeats), **screened_pnm_issue(repeats, "predicted")})
    for name in ("pnm", "pnm_screened", "pnm_predicted", "wouaf"):
        out[f"issue_ratio_stable_signature_over_{name}"] = (out["issue_copy_stable_signature_s"]
                                                            / out[f"issue_copy_{name}_s"])
    return out


def bench_issue_sd() -> dict[str, float]:
    """The issue ratio at Stable Diffusion's decoder size and Stable Signature's 256 px, batch 4."""
    row = issue_cost_sd()
    return {
        "sd_parameters_m": row["parameters_m"],
        "sd_issue_copy_pnm_s_median": row["pnm_issue_s"],
        "sd_stable_signature_s_1_step": row["stable_signature_s_timed"][0],
        "sd_stable_signature_s_3_steps": row["stable_signature_s_timed"][1],
        "sd_stable_signature_per_step_s": row["stable_signature_per_step_s"],
        "sd_stable_signature_fixed_s": row["stable_signature_fixed_s"],
        "sd_stable_signature_100_steps_estimate_s": row["stable_signature_100_steps_estimate_s"],
        "sd_issue_ratio_stable_signature_over_pnm_estimate": row["ratio_estimate"],
        "sd_probe_per_image_s": row["probe_per_image_s"], "sd_probe_fixed_s": row["probe_fixed_s"],
        "sd_issue_copy_pnm_screened_estimate_s": row["screened_issue_estimate_s"],
        "sd_issue_ratio_stable_signature_over_pnm_screened_estimate": row["screened_ratio_estimate"],
        "sd_issue_copy_pnm_predicted_s": row["predicted_issue_s"],
        "sd_issue_ratio_stable_signature_over_pnm_predicted_estimate": row["predicted_ratio_estimate"],
        "sd_predictor_fit_once_estimate_s": row["predictor_fit_estimate_s"],
    }


def bench_startup(repeats: int = 3) -> dict[str, float]:
    """Wall seconds of ``python -m fingerprint_lm --help`` and of ``import fingerprint_lm.tasks``."""
    def timed(args: list[str]) -> float:
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            subprocess.run(args, cwd=tempfile.gettempdir(), capture_output=True, check=True)
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    return {"cli_help_s": timed([sys.executable, "-m", "fingerprint_lm", "--help"]),
            "import_tasks_s": timed([sys.executable, "-c", "import fingerprint_lm.tasks"])}


def bench_sweep() -> dict[str, float]:
    """The README's collusion sweep command in a fresh directory with an empty cache (cold: the
    fid_proxy net, stable_signature's whitened reader and every copy's training included), then the
    same command again in the same directory (warm: a new multirun dir, so every point is scored
    again, with the cached models and fid_proxy net). The cold run's summary.md is kept in
    ``experiments/results/bench_sweep_summary.md``."""
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        env = {"FINGERPRINT_LM_CACHE": str(Path(tmp) / "cache"), "PATH": "/usr/bin:/bin",
               "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline", "HOME": tmp}
        for label in ("cold", "warm"):
            start = time.perf_counter()
            result = subprocess.run(SWEEP_COMMAND, cwd=tmp, env=env, capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"sweep failed ({label}): {result.stderr[-2000:]}")
            out[f"sweep_{label}_s"] = time.perf_counter() - start
        summaries = sorted(Path(tmp).glob("outputs/multiruns/**/summary.md"))
        out["sweep_points"] = 0.0
        if summaries:
            # the cold and the warm run each write a multirun folder: count the last one's points
            out["sweep_points"] = float(len(list(summaries[-1].parent.glob("*/metrics.json"))))
            kept = ROOT / "experiments" / "results" / "bench_sweep_summary.md"
            kept.write_text(summaries[0].read_text())  # the cold run's (folders are named by start time)
    # the largest of this process's children: the sweep commands (run in a process of its own)
    out["sweep_peak_rss_mb"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return out


def _sd_training_step(resolution: int, batch_size: int, bits: int, checkpointing: bool) -> dict[str, float]:
    """One worst-case step (K=1) of a PNM on an SD-sized decoder (random weights); bf16 autocast on
    CUDA (a CPU without bf16 units is slower in bf16 than in float32)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    vae = build_vae(SD_VAE_CONFIG)
    pnm = PersonalizedDecoder(vae.decoder, bits, post_quant_conv=vae.post_quant_conv,
                              gradient_checkpointing=checkpointing)
    module = manual_stepping(FingerprintModule(vae, pnm, FingerprintExtractor(bits), wc_steps=1)).to(device)
    images = torch.rand(batch_size, 3, resolution, resolution, device=device) * 2 - 1

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            module.training_step({"image": images}, 0)
        if device.type == "cuda":
            torch.cuda.synchronize()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds = _mean_seconds(step, 1, warmup=1)
    out = {"train_step_s": seconds}
    if device.type == "cuda":
        out["cuda_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def bench_sd_training(resolution: int | None = None, batch_size: int = 1, bits: int = 48) -> dict[str, float]:
    resolution = resolution or (256 if torch.cuda.is_available() else 64)
    out: dict[str, float] = {}
    for checkpointing in (False, True):
        tag = f"sd_{resolution}px_b{batch_size}_{'ckpt' if checkpointing else 'plain'}"
        result = _in_fresh_process(_sd_training_step, resolution, batch_size, bits, checkpointing)
        out.update({f"{tag}_{key}": value for key, value in result.items()})
    return out


# -- running and writing ----------------------------------------------------------------------------
def _section(fn: Callable[..., dict], threads: int | None, *args) -> dict:
    if threads:
        torch.set_num_threads(threads)
    result = fn(*args)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    return result


def _in_fresh_process(fn: Callable[..., dict], *args, threads: int | None = None) -> dict:
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(_section, fn, threads, *args).result()


SECTIONS: dict[str, tuple[Callable[..., dict], str]] = {
    "training": (bench_training, "training step, batch 32, 32 px, 48 bits: plain and worst-case (K=1) variants"),
    "inference": (bench_inference, "throughput, batch 64, 32 px"),
    "issue": (bench_issue_methods, "issuing one copy per method (code -> copy tensors, ACT all; pnm also with its "
              "code screened on the probe, and by its read predictor, as task=issue screens it by default)"),
    "distributor": (bench_distributor, "issuing one copy of the default method's shipped checkpoint (pnm), step by "
                    "step"),
    "registry": (bench_registry, "identification among 10^6 registered 48-bit codes; registration"),
    "startup": (bench_startup, "start-up of the CLI"),
    "issue_sd": (bench_issue_sd, "issuing one copy on an SD-sized decoder (83.7M parameters, random weights), 256 px, "
                 "batch 4: pnm measured; stable_signature's 100-step fine-tune **estimated** as fixed + 100 x per "
                 "step from timed 1- and 3-step runs (a full run is about an hour here); a screened pnm copy "
                 "**estimated** from probe reads of 2 and 6 images, at the shipped checkpoint's 64 and pass rate; "
                 "screened by the read predictor: measured, its one-off fit estimated"),
}


def _format(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def markdown(results: dict[str, dict], command: str, seconds: float, threads: int) -> str:
    lines = [
        "# Benchmarks", "",
        f"Written by `{command}` on {time.strftime('%Y-%m-%d %H:%M %Z')} in {seconds / 60:.1f} min: "
        f"torch {torch.__version__}, {threads} torch threads per section, "
        f"{platform.processor() or platform.machine()}, "
        f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}. "
        "Each section ran in a fresh process: `peak_rss_mb` is that process's peak resident memory. "
        "Seconds are means over repeats (the training section's variants timed in alternating blocks, "
        "so the machine's drift hits the plain step and each worst-case step alike); "
        "compare ratios across machines, not seconds.", "",
    ]
    for name, figures in results.items():
        title = SECTIONS[name][1] if name in SECTIONS else {
            "sweep": "the README's default collusion sweep (`python -m fingerprint_lm +experiment=collusion_sweep`)",
            "sd": "one worst-case step of a PNM on an SD-sized decoder (random weights, batch 1)"}[name]
        lines += [f"## {name}: {title}", "",
                  *markdown_lines(["figure", "value"], [[key, _format(value)] for key, value in figures.items()]), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None, help="torch threads per section (default: torch's)")
    parser.add_argument("--sweep", action="store_true", help="also run the README's collusion sweep cold and warm")
    parser.add_argument("--sd", action="store_true", help="also time an SD-sized decoder step (minutes on a CPU)")
    parser.add_argument("--sd-only", action="store_true", help="only the SD-sized step")
    parser.add_argument("--sd-resolution", type=int, default=None, help="SD image side (default: 256 CUDA, 64 CPU)")
    parser.add_argument("--only", nargs="*", choices=sorted(SECTIONS), help="run only these sections")
    parser.add_argument("--write", type=Path, default=None, help="also write the figures as markdown here")
    args = parser.parse_args()
    start = time.perf_counter()
    results: dict[str, dict] = {}
    for name in [] if args.sd_only else (args.only or SECTIONS):
        results[name] = _in_fresh_process(SECTIONS[name][0], threads=args.threads)
        _print(name, results[name])
    if args.sd or args.sd_only:
        results["sd"] = bench_sd_training(args.sd_resolution)
        _print("sd", results["sd"])
    if args.sweep:
        # in a fresh process too: its children's peak memory is then the sweep's alone, not the
        # SD-sized issue section's
        results["sweep"] = _in_fresh_process(bench_sweep, threads=args.threads)
        _print("sweep", results["sweep"])
    if args.write:
        command = "python -m fingerprint_lm.bench " + " ".join(sys.argv[1:])
        text = markdown(results, command.strip(), time.perf_counter() - start, args.threads or torch.get_num_threads())
        if not (args.sd or args.sd_only):
            text += "\nThe SD-sized step (`--sd`) and the clean-fid path were not run here (no GPU).\n"
        atomic_write_text(args.write, text)


def _print(section: str, results: dict) -> None:
    print(f"# {section}", flush=True)
    width = max(len(k) for k in results)
    for key, value in results.items():
        print(f"{key:<{width}}  {_format(value)}", flush=True)


if __name__ == "__main__":
    main()
