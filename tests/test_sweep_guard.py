"""A failed command leaves nothing of its own: fingerprint_lm/sweep_guard.py."""

from __future__ import annotations

from fingerprint_lm.sweep_guard import STARTED_SWEEPS, remove_bare_job_dir, remove_unstarted_sweeps


def _job(path, *extra):
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "config.yaml").write_text("seed: 0\n")
    (path / "fingerprint_lm.log").write_text("")
    for name in extra:
        (path / name).write_text("{}")
    return path


def test_a_bare_job_dir_goes_with_the_empty_folders_above_it(tmp_path):
    outputs = tmp_path / "outputs"
    job = _job(outputs / "runs" / "2026-12-04_12-00-00")
    (tmp_path / "mine.txt").write_text("the user's")
    remove_bare_job_dir(job, outputs)
    assert not outputs.exists() and (tmp_path / "mine.txt").exists()  # stops at the root


def test_a_job_that_wrote_something_keeps_everything(tmp_path):
    outputs = tmp_path / "outputs"
    job = _job(outputs / "runs" / "a", "metrics.json")
    remove_bare_job_dir(job, outputs)
    assert (job / "metrics.json").exists() and (job / ".hydra").is_dir()


def test_other_runs_and_started_sweeps_stay(tmp_path):
    outputs = tmp_path / "outputs"
    other = _job(outputs / "runs" / "earlier", "metrics.json")
    sweep = outputs / "multiruns" / "s"
    done = _job(sweep / "0", "metrics.json")
    (sweep / "multirun.yaml").write_text("{}")
    STARTED_SWEEPS.append((sweep, outputs))
    remove_bare_job_dir(_job(sweep / "1"), outputs)
    assert not (sweep / "1").exists() and done.exists() and other.exists()


def test_an_unstarted_sweep_goes_with_its_only_failed_job(tmp_path):
    outputs = tmp_path / "outputs"
    sweep = outputs / "multiruns" / "s"
    job = _job(sweep / "0")
    (sweep / "multirun.yaml").write_text("{}")
    STARTED_SWEEPS.append((sweep, outputs))
    remove_bare_job_dir(job, outputs)
    assert not outputs.exists()


def test_a_folder_outside_the_log_dir_is_never_touched(tmp_path):
    job = _job(tmp_path / "elsewhere")
    remove_bare_job_dir(job, tmp_path / "outputs")
    assert job.exists()


def test_an_unstarted_sweep_takes_the_empty_folders_above_it_up_to_the_log_dir(tmp_path):
    outputs = tmp_path / "outputs"
    sweep = outputs / "multiruns" / "s"
    sweep.mkdir(parents=True)
    (sweep / "multirun.yaml").write_text("{}")
    (outputs / "runs").mkdir()  # an earlier run's folder stops the pruning
    STARTED_SWEEPS.append((sweep, outputs))
    remove_unstarted_sweeps()
    assert not (outputs / "multiruns").exists() and (outputs / "runs").is_dir()


def test_a_sweep_dir_outside_the_log_dir_takes_no_folder_above_it(tmp_path):
    sweep = tmp_path / "mine" / "s"
    sweep.mkdir(parents=True)
    (sweep / "multirun.yaml").write_text("{}")
    STARTED_SWEEPS.append((sweep, tmp_path / "outputs"))
    remove_unstarted_sweeps()
    assert not sweep.exists() and (tmp_path / "mine").is_dir()
