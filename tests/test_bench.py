"""``make bench``'s plumbing (fingerprint_lm/bench.py), without its timings: the page it writes and
the SD-sized issue measurement on a small image side."""

from __future__ import annotations

import json

import pytest
import torch

from fingerprint_lm import bench
from fingerprint_lm.models.checkpoint import shipped_checkpoint


def test_the_page_names_its_command_every_section_and_what_was_not_run():
    results = {"issue": {"issue_copy_pnm_s": 0.004, "issue_ratio_stable_signature_over_pnm": 1328.0},
               "issue_sd": {"sd_issue_ratio_stable_signature_over_pnm_estimate": 19880.0, "peak_rss_mb": 8955.0},
               "sweep": {"sweep_cold_s": 739.6}}
    page = bench.markdown(results, "python -m fingerprint_lm.bench --sweep", 1812.0, 2)
    assert page.startswith("# Benchmarks\n")
    assert "`python -m fingerprint_lm.bench --sweep`" in page and "in 30.2 min" in page
    for name in results:
        assert f"## {name}: " in page
    assert "**estimated**" in page  # the SD-sized stable_signature figure says it is an estimate
    assert "| issue_ratio_stable_signature_over_pnm | 1328 |" in page
    assert "| sd_issue_ratio_stable_signature_over_pnm_estimate | 1.988e+04 |" in page


def test_training_variants_are_timed_in_alternating_blocks_so_drift_hits_each_alike():
    """The worst-case ratios divide by the plain step: timed one after another, a machine that slows
    between them moves the ratio; round-robin blocks of 2 calls spread the drift over all."""
    calls: list[str] = []
    steps = {name: (lambda n=name: calls.append(n)) for name in ("plain", "lagged", "every2")}
    seconds = bench._interleaved_mean_seconds(steps, repeats=6, block=2, warmup=1)
    assert set(seconds) == set(steps)
    timed = calls[3:]  # after one warm-up call each
    assert timed == ["plain", "plain", "lagged", "lagged", "every2", "every2"] * 3


@pytest.mark.slow  # an SD-sized decoder and its fine-tune: ~8 s and a few GB
def test_issue_cost_sd_measures_both_methods_on_the_sd_sized_decoder():
    """The issue_sd section's function at a tiny image side (the decoder is SD's size: ~10 s)."""
    row = bench.issue_cost_sd(resolution=16, batch_size=1, steps=(1, 2), repeats=1, bits=8)
    assert row["parameters_m"] == pytest.approx(83.65, abs=0.01)
    assert len(row["pnm_issue_s_all"]) == 1 and row["ratio_estimate"] > 1  # even one copy at 16 px
    seconds = row["stable_signature_s_timed"]
    assert row["stable_signature_per_step_s"] == pytest.approx(seconds[1] - seconds[0])
    assert row["stable_signature_100_steps_estimate_s"] == pytest.approx(
        row["stable_signature_fixed_s"] + 100 * row["stable_signature_per_step_s"])
    assert row["ratio_estimate"] == pytest.approx(row["stable_signature_100_steps_estimate_s"] / row["pnm_issue_s"])
    # a screened copy: the shipped checkpoint's draws (1 / pass rate) of a 64-image probe read, estimated
    screen = json.loads((shipped_checkpoint("embedded_pnm") / "fingerprint.json").read_text())["issue_screen"]
    draw = row["probe_fixed_s"] + screen["probe_images"] * row["probe_per_image_s"]
    assert row["screened_issue_estimate_s"] == pytest.approx(row["pnm_issue_s"] + draw / screen["pass_rate"])
    assert row["screened_ratio_estimate"] < row["ratio_estimate"]
    # a predicted screen reads the code only: the unscreened issue plus a predicted draw, and a fit once
    assert row["pnm_issue_s"] < row["predicted_issue_s"] < row["screened_issue_estimate_s"]
    assert row["predictor_fit_estimate_s"] == pytest.approx(screen["predictor"]["fit_codes"] * draw)


def test_the_inference_section_times_both_shipped_pnm_readers():
    """The content reader (a base VAE round trip an image) is timed beside the band reader it wraps
    (the shipped checkpoint has both)."""
    figures = bench._shipped_reader_throughput(torch.rand(4, 3, 32, 32) * 2 - 1, repeats=1)
    assert set(figures) == {"pnm_band_reader_images_per_s", "pnm_content_reader_images_per_s"}
    # the content reader re-makes each image with the base VAE first: ~17x slower in BENCHMARKS.md
    assert figures["pnm_content_reader_images_per_s"] < figures["pnm_band_reader_images_per_s"]
