"""The analysis scripts in experiments/ fail on bad input the way the entry point does: one
``error:`` line, exit code 2, nothing written."""

from __future__ import annotations

import runpy
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from fingerprint_lm.models.checkpoint import load_fingerprint_model, shipped_checkpoint
from tests.conftest import ROOT


def run_script(script: str, args: list[str], monkeypatch, capsys, with_stdout: bool = False) -> tuple:
    """Run ``experiments/<script>`` as ``python experiments/<script> args`` would, in this process
    (the subprocess start-up, a fresh torch import, cost ~5 s a case): its exit code and stderr.
    An exception that escapes the script's own error handling fails the test with its traceback.
    ``with_stdout``: its stdout too, as a third value."""
    path = ROOT / "experiments" / script
    monkeypatch.setattr(sys, "argv", [str(path), *args])
    monkeypatch.syspath_prepend(str(path.parent))  # the scripts import their neighbours
    try:
        runpy.run_path(str(path), run_name="__main__")
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return (code, captured.err, captured.out) if with_stdout else (code, captured.err)


def assert_refused_leaving_results(script: str, args: list[str], monkeypatch, capsys) -> None:
    """``experiments/<script> args`` is one ``error:`` line and exit 2, and its results file
    (``results/<script>.jsonl``) is as it was: no row appended, none created."""
    results = ROOT / "experiments" / "results" / script.replace(".py", ".jsonl")
    before = results.read_text() if results.exists() else None
    code, stderr = run_script(script, args, monkeypatch, capsys)
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1, stderr
    assert (results.read_text() if results.exists() else None) == before


@pytest.mark.parametrize("script", ["base_vs_copy.py", "fid_proxy_floor.py"])
def test_missing_checkpoint_is_one_line_and_exit_2(tmp_path, script, monkeypatch, capsys):
    out = tmp_path / "figure.png"
    extra = ["--out", str(out)] if script == "base_vs_copy.py" else []
    code, stderr = run_script(script, ["--checkpoint", str(tmp_path / "missing"), *extra], monkeypatch, capsys)
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "no fingerprint checkpoint" in errors[0], stderr
    assert not out.exists()


@pytest.mark.parametrize("args", [["--steps", "0"], ["--schedules", "cosine"], ["--checkpoint", "embedded"]])
def test_lr_warmdown_probe_refuses_bad_input_before_training(args, monkeypatch, capsys):
    """A bad schedule or length, or a checkpoint that is not pnm, is one error line, exit 2, and no
    row appended to the results."""
    assert_refused_leaving_results("lr_warmdown_probe.py", args, monkeypatch, capsys)


@pytest.mark.parametrize(("args", "refusal"), [(["--arms", "groupnorm,nonsense"], "--arms takes"),
                                               (["--steps", "0"], "--steps must be a positive integer")])
def test_pnm_conv_sites_refuses_bad_input_before_training(args, refusal, monkeypatch, capsys):
    """An unknown arm or a non-positive length is one error line and exit 2 before any training
    run starts (no command printed), and no row is appended to the results."""
    results = ROOT / "experiments" / "results" / "pnm_conv_sites.jsonl"
    before = results.read_text() if results.exists() else None
    code, stderr, stdout = run_script("pnm_conv_sites.py", args, monkeypatch, capsys, with_stdout=True)
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and refusal in errors[0], stderr
    assert "$ " not in stdout
    assert (results.read_text() if results.exists() else None) == before


@pytest.mark.parametrize("occupied", ["file", "folder"])
def test_pnm_conv_sites_refuses_an_occupied_keep_folder(tmp_path, occupied, monkeypatch, capsys):
    """--keep names a new or empty folder: a file, or a folder with something in it, is one error
    line and exit 2 before any training, and both stay as they were."""
    keep = tmp_path / "keep"
    if occupied == "file":
        keep.write_text("mine")
    else:
        keep.mkdir()
        (keep / "notes.txt").write_text("mine")
    code, stderr, stdout = run_script("pnm_conv_sites.py", ["--keep", str(keep)], monkeypatch, capsys,
                                      with_stdout=True)
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "--keep" in errors[0], stderr
    assert "$ " not in stdout
    assert (keep.read_text() if occupied == "file" else sorted(p.name for p in keep.iterdir())) == (
        "mine" if occupied == "file" else ["notes.txt"])


@pytest.mark.parametrize(("script", "args"), [
    ("soft_attribution.py", ["--users", "0"]),
    ("soft_attribution.py", ["--users", "8", "--registry", "4"]),
    ("soft_attribution.py", ["--fpr", "2"]),
    ("soft_calibration.py", ["--images", "0"]),
    ("soft_calibration.py", ["--registries", "0"]),
    ("soft_weight_whitening.py", ["--fit", "0"]),
    ("soft_code_null.py", ["--users", "1"]),
    ("calibrated_soft_attribution.py", ["--fit-users", "0"]),
    ("calibrated_soft_attribution.py", ["--fpr", "2"]),
])
def test_soft_decoding_scripts_refuse_bad_input_before_any_work(script, args, monkeypatch, capsys):
    """A non-positive count, a registry smaller than the users given copies, or an fpr outside
    (0, 1) is one error line and exit 2, and no row is appended to the results."""
    assert_refused_leaving_results(script, args, monkeypatch, capsys)


@pytest.mark.parametrize(("script", "args"), [
    ("mark_readability.py", ["--steps", "0"]),
    ("mark_readability.py", ["--train-images", "100"]),
    ("mark_readability.py", ["--ridge", "0"]),
    ("mark_readability.py", ["--checkpoint", "embedded"]),
    ("signature_ceiling.py", ["--users", "0"]),
    ("signature_ceiling.py", ["--eval-steps", "100", "0"]),
    ("signature_ceiling.py", ["--image-weights", "-1"]),
    ("signature_ceiling.py", ["--resolution", "30"]),
    ("differential_reader_probe.py", ["--steps", "0"]),
    ("differential_reader_probe.py", ["--arms", "plain,other"]),
    ("whitening_penalty_probe.py", ["--weights", "1", "0"]),
    ("whitening_penalty_probe.py", ["--pool-batch", "48"]),
    ("compiled_issue_probe.py", ["--repeats", "0"]),
    ("compiled_issue_probe.py", ["--signature-repeats", "-1"]),
    ("view_averaging.py", ["--users", "0"]),
    ("nuisance_projection.py", ["--dims", "30"]),
    ("nuisance_projection.py", ["--fit-attacks", "mirror"]),
    ("nuisance_projection.py", ["--fit-images", "8"]),
    ("view_averaging.py", ["--users", "8", "--registry", "4"]),
    ("pnm_augment_finetune.py", ["--steps", "0"]),
    ("whitening_table.py", ["run=/nonexistent"]),
    ("whitening_table.py", ["no-label-given"]),
    ("pnm_augment_finetune.py", ["--init-from", "/nonexistent/fingerprint_model"]),
    ("jpeg_chroma_probe.py", ["--users", "0"]),
    ("luma_reader_probe.py", ["--steps", "0"]),
    ("band_frequency_probe.py", ["--steps", "0"]),
    ("code_screening.py", ["--candidates", "2"]),
    ("code_screening.py", ["--keep", "1.5"]),
    ("code_screening.py", ["--probe", "0"]),
    ("code_screening.py", ["--null-images", "-1"]),
    ("default_condition.py", ["--users", "0"]),
    ("default_condition.py", ["--users", "8", "--registry", "4"]),
    ("default_condition.py", ["--min-probe-bit-acc", "1.5"]),
    ("default_condition.py", ["--min-probe-psnr", "0"]),
    ("default_condition.py", ["--screen", "predicted", "--min-probe-psnr", "30"]),
    ("screened_marked_null.py", ["--registry", "0"]),
    ("screened_marked_null.py", ["--fpr", "2"]),
    ("screened_code_bias.py", ["--codes", "0"]),
    ("copy_gain.py", ["--codes", "0"]),
    ("copy_gain.py", ["--gains", "1", "-0.5"]),
    ("screen_policy.py", ["--codes", "2"]),
    ("screen_policy.py", ["--min-psnr", "30", "0"]),
    ("screen_policy.py", ["--registry", "1"]),
    ("screen_statistic.py", ["--codes", "2"]),
    ("screen_statistic.py", ["--min-psnr", "0"]),
    ("screen_statistic.py", ["--probe-sizes", "16", "65"]),
    ("code_predictor.py", ["--train-codes", "5"]),
    ("code_predictor.py", ["--prefilter", "0.5", "1.5"]),
    ("code_predictor.py", ["--registry", "1"]),
    ("code_predictor.py", ["--fit-probe-images", "65"]),
    ("predicted_screen_policy.py", ["--codes", "2"]),
    ("predicted_screen_policy.py", ["--rates", "0.3", "0"]),
    ("predicted_screen_policy.py", ["--min-psnr", "-1"]),
    ("ratio_reader.py", ["--users", "0"]),
    ("ratio_reader.py", ["--train-images", "100"]),
    ("ratio_reader.py", ["--null-images", "8"]),
    ("ratio_reader.py", ["--users", "8", "--registry", "10"]),  # 8 + 4 calibration users need 12
    ("ratio_reader.py", ["--calibration-users", "0"]),
    ("ratio_reader.py", ["--unmarked", "100"]),
    ("ratio_reader.py", ["--steps", "0"]),
    ("ratio_reader.py", ["--attack-weights", "1,x"]),
    ("ratio_reader.py", ["--attack-weights", "0.5,0"]),
    ("ratio_reader.py", ["--attack-weights", "inf"]),
    ("ratio_reader.py", ["--content-readers", "no_such_checkpoint"]),
    ("read_threshold_probe.py", ["--images", "0"]),
    ("read_threshold_probe.py", ["--calibration", "-4"]),
    ("content_reader_training.py", ["--steps", "0"]),
    ("content_reader_training.py", ["--arms", "band,pooled"]),
    ("content_reader_training.py", ["--images", "0"]),
    ("colour_covariance_reader.py", ["--users", "0"]),
    ("colour_covariance_reader.py", ["--train-images", "100"]),
    ("colour_covariance_reader.py", ["--unmarked", "100"]),
    ("colour_covariance_reader.py", ["--steps", "0"]),
    ("colour_covariance_reader.py", ["--attack-weight", "-1"]),
    ("colour_covariance_reader.py", ["--attack-weight", "inf"]),
    ("colour_covariance_reader.py", ["--users", "8", "--registry", "10"]),
    ("colour_covariance_reader.py", ["--readers", "energy,kurtosis"]),
])
def test_issue_11_probes_refuse_bad_input_before_any_work(script, args, monkeypatch, capsys):
    """A bad count, step or weight, or a checkpoint without a reference VAE (carrier), is one
    error line and exit 2, and no row is appended to the results."""
    assert_refused_leaving_results(script, args, monkeypatch, capsys)


@pytest.mark.parametrize("script, checkpoint, extra, refusal", [
    ("fit_soft_whitening.py", "embedded_pnm", [], "carrier"),  # only the carrier reader has a soft whitening
    ("fit_issue_screen.py", "embedded_pnm", [], "already records issue_screen"),  # fitted once
    ("fit_issue_screen.py", "embedded", [], "the floors are pnm's"),
    ("fit_issue_screen.py", "embedded_pnm", ["--rate-only", "--rate-candidates", "0"], "--rate-candidates"),
    ("fit_issue_screen.py", "embedded_pnm", ["--rate-only", "--refit"], "give one of them"),
    ("fit_issue_screen.py", "embedded_pnm", ["--predictor", "--rate-only"], "give one of them"),
    ("fit_issue_screen.py", "embedded_pnm", ["--predictor", "--predictor-codes", "3"], "--predictor-codes"),
    ("fit_issue_screen.py", "embedded", ["--predictor"], "the floors are pnm's"),
    ("fit_content_reader.py", "embedded_pnm", [], "has a content reader already"),  # fitted once
    ("fit_content_reader.py", "embedded", [], "the content reader is pnm's"),
    ("fit_content_reader.py", "embedded_pnm", ["--refit", "--seed", "-1"], "--seed"),
])
def test_a_post_training_fit_refuses_a_checkpoint_it_does_not_apply_to_and_leaves_it(
        tmp_path, script, checkpoint, extra, refusal, monkeypatch, capsys):
    """One error line, exit 2, and the checkpoint's files as they were."""
    target = tmp_path / checkpoint
    shutil.copytree(shipped_checkpoint(checkpoint), target)
    before = {p.name: p.read_bytes() for p in target.rglob("*") if p.is_file()}
    code, stderr = run_script(script, [str(target), *extra], monkeypatch, capsys)
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and refusal in errors[0], stderr
    assert {p.name: p.read_bytes() for p in target.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("checkpoint, refusal", [("embedded_pnm", "calibrated already"), ("embedded", "only pnm")])
def test_fit_bit_slopes_calibrates_a_pnm_checkpoint_once(tmp_path, checkpoint, refusal, monkeypatch, capsys):
    """The shipped pnm checkpoint is calibrated: a second fit (which would scale its logits again)
    and a carrier checkpoint are one error line, exit 2, unchanged. The same checkpoint with its
    reader's scale reset is calibrated again: a new reader, checksums that verify."""
    target = tmp_path / checkpoint
    shutil.copytree(shipped_checkpoint(checkpoint), target)
    before = {p.name: p.read_bytes() for p in target.rglob("*") if p.is_file()}
    code, stderr = run_script("fit_bit_slopes.py", [str(target)], monkeypatch, capsys)
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and refusal in errors[0], stderr
    assert {p.name: p.read_bytes() for p in target.rglob("*") if p.is_file()} == before
    if checkpoint != "embedded_pnm":
        return
    state = load_file(target / "fingerprint.safetensors")
    state["extractor.bit_scale"] = torch.ones_like(state["extractor.bit_scale"])
    save_file(state, target / "fingerprint.safetensors")
    (target / "SHA256SUMS").unlink()  # as if never calibrated: a checkpoint from before 2026-12-06
    assert run_script("fit_bit_slopes.py", [str(target), "--images", "256"], monkeypatch, capsys)[0] == 0
    assert (target / "fingerprint.safetensors").read_bytes() != before["fingerprint.safetensors"]
    assert load_fingerprint_model(target).meta["recipe"]["bit_calibration_images"] == 256  # checksums verify


@pytest.mark.parametrize("spec", ["no_label_path.json", "run=missing/metrics.json", "run={bad}"])
def test_metrics_table_refuses_a_missing_or_foreign_file(tmp_path, spec, monkeypatch, capsys):
    """A spec without a label, a missing file or one that is not a run's metrics.json: one error
    line, exit 2."""
    if spec == "run={bad}":
        (tmp_path / "other.json").write_text('{"loss": 1.0}')
        spec = f"run={tmp_path / 'other.json'}"
    code, stderr = run_script("metrics_table.py", [spec], monkeypatch, capsys)
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1, stderr


@pytest.mark.parametrize("checkpoint", ["embedded_pnm", "embedded"])
def test_compiled_issue_probe_equals_the_shipped_issuance(checkpoint, monkeypatch):
    """The probe's compiled copy is the shipped path's copy to float32 rounding (a few ulp), for
    every ACT type and scope, the carrier's bias map included: what it times is the same work."""
    monkeypatch.syspath_prepend(str(ROOT / "experiments"))
    # an experiments/ script: importable only once the line above put experiments/ on sys.path
    from compiled_issue_probe import _max_relative_difference

    model = load_fingerprint_model(shipped_checkpoint(checkpoint))
    for act_type in ("none", "permute", "sign", "scale", "all"):
        for scope in ("stream", "interior", "both"):
            assert _max_relative_difference(model, act_type, scope) < 1e-6, (act_type, scope)


@pytest.mark.parametrize("script, run_model, refusal", [
    ("ship_second_cycle.py", "missing", "no fingerprint checkpoint there"),
    ("ship_second_cycle.py", "shipped", "already records a second cycle"),
    ("ship_content_cycle.py", "missing", "no fingerprint checkpoint there"),
    ("ship_content_cycle.py", "shipped", "is not the first and second cycle of pnm.yaml's recipe"),
])
def test_a_ship_script_refuses_what_is_not_its_cycle_of_the_shipped_model(
        tmp_path, script, run_model, refusal, monkeypatch, capsys):
    """A folder without a checkpoint, or any run once the shipped pnm checkpoint is itself the
    cycle the script ships (or a later one), is one error line, exit 2, and nothing written."""
    folder = tmp_path / "missing" if run_model == "missing" else shipped_checkpoint("embedded_pnm")
    args = [str(folder), "--out", str(tmp_path / "out")]
    code, stderr = run_script(script, args, monkeypatch, capsys)
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and refusal in errors[0], stderr
    assert not (tmp_path / "out").exists()
