"""SLURM via submitit: the launcher config, resuming from last.ckpt, and a real requeue.

No SLURM here: ``hydra/launcher=slurm`` is checked up to the sbatch script it hands to ``sbatch``
(a stand-in records it); the requeue path runs for real with ``hydra/launcher=submitit_local``,
whose jobs handle the scheduler's preemption signal (USR2) exactly as on SLURM.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from fingerprint_lm import storage as cache
from fingerprint_lm.distributor.copies import write_copy
from fingerprint_lm.errors import CheckpointError
from fingerprint_lm.lit import stages
from fingerprint_lm.models.checkpoint import shipped_checkpoint
from fingerprint_lm.tasks import run
from fingerprint_lm.tasks.train import model_spec, quiet_trainer_factory
from tests.conftest import CONF, DEBUG_TINY, ROOT, compose_config

ENV = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "WANDB_MODE": "offline"}


class TrainingAttempts(L.Callback):
    """Test-only: appends the step each training attempt starts from to ``<run dir>/attempts.txt``;
    with ``preempt_at`` > 0, the first attempt sends its own process the scheduler's preemption
    signal (submitit's USR2) once it has completed that many steps."""

    def __init__(self, preempt_at: int = 0):
        self.preempt_at = preempt_at
        self.start_step = -1

    def on_train_start(self, trainer, pl_module):
        self.start_step = trainer.global_step
        with open(Path(trainer.default_root_dir) / "attempts.txt", "a") as handle:
            handle.write(f"{self.start_step}\n")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.preempt_at and self.start_step == 0 and trainer.global_step == self.preempt_at:
            os.kill(os.getpid(), signal.SIGUSR2)


# `tests.test_slurm` (not pytest's module name): the sweep's job processes import it from the repo root
ATTEMPTS = "+callbacks.attempts._target_=tests.test_slurm.TrainingAttempts"


def _curve(run_dir: Path) -> list[dict]:
    with open(run_dir / "training_curve.csv") as handle:
        return list(csv.DictReader(handle))


def _compose_with_hydra(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=overrides, return_hydra_config=True)


def test_slurm_launcher_config_follows_the_trainer():
    cfg = _compose_with_hydra(["hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2"])
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 4, 4)
    assert launcher.partition is None and launcher.account is None  # set per cluster
    # the requeue signal comes inside the job's time, early enough for a checkpoint write
    assert 0 < launcher.signal_delay_s < launcher.timeout_min * 60 and launcher.max_num_timeout >= 1
    assert OmegaConf.to_container(launcher)["submitit_folder"] == "${hydra.sweep.dir}/.submitit/%j"
    single = _compose_with_hydra(["hydra/launcher=slurm", "trainer=gpu"]).hydra.launcher
    assert (single.nodes, single.tasks_per_node, single.gpus_per_node) == (1, 1, 1)


def _stand_in_cluster(tmp_path: Path) -> Path:
    """A folder of stand-ins to put first on PATH: `sbatch` keeps each script it is handed
    (``submitted_<n>.sh`` in ``tmp_path``, numbered) and refuses the job, so a launch stops there;
    `srun` exists (submitit checks); `python` is this interpreter (for scripts that call `python`)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(
        f'#!/bin/sh\nn=$(ls {tmp_path} | grep -c submitted)\ncp "$1" {tmp_path}/submitted_$n.sh\n'
        'echo "no cluster here" >&2\nexit 1\n')
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 1\n")
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    for tool in ("sbatch", "srun", "python"):
        (bin_dir / tool).chmod(0o755)
    return bin_dir


def test_slurm_sweep_submits_one_task_per_gpu(tmp_path):
    bin_dir = _stand_in_cluster(tmp_path)
    sweep_dir = tmp_path / "sweep"
    command = [
        sys.executable, "-m", "fingerprint_lm", "-m", "hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4",
        "trainer.num_nodes=2", "hydra.launcher.partition=gpu", "hydra.launcher.account=lab",
        "+hydra.launcher.additional_parameters.mail-type=END", f"hydra.sweep.dir={sweep_dir}",
        f"paths.root_dir={tmp_path}", "logger=none", "seed=0,1",
    ]
    out = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env={**ENV, "PATH": f"{bin_dir}:{ENV['PATH']}"})
    assert out.returncode != 0 and "no cluster here" in out.stderr, out.stderr[-3000:]
    script = (tmp_path / "submitted_0.sh").read_text()
    for line in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--cpus-per-task=8", "--mem=64GB",
                 "--time=240", "--partition=gpu", "--account=lab", "--signal=USR2@120", "--array=0-1%2",
                 "--mail-type=END", f"--output={sweep_dir}/.submitit/%A_%a/"):
        assert f"#SBATCH {line}" in script, (line, script)
    assert "srun" in script and "submitit.core._submit" in script


SWEEP_SCRIPT = ROOT / "experiments" / "slurm" / "sd2_coco_collusion_sweep.sh"


@pytest.mark.slow  # two sweeps composed and pickled for submitit: ~25 s
def test_the_slurm_recipes_sweep_submits_its_models_method_alone(tmp_path):
    """experiments/slurm/sd2_coco_collusion_sweep.sh, steps 2 and 3, up to a stand-in sbatch: a given
    checkpoint serves one method, so the grid holds that method's points only (pnm: 5 ACT types x 29
    cases, less the 42 image-level single-copy points sweep.grid.skip leaves out at permute, scale
    and sign = 103), and step 2 submits the one point that warms the caches. (The recipe once swept
    method=carrier over a pnm model and the grid's four methods: every point would have failed.)"""
    bin_dir = _stand_in_cluster(tmp_path)
    model = shipped_checkpoint("embedded_pnm")
    env = {**ENV, "PATH": f"{bin_dir}:{ENV['PATH']}", "PARTITION": "gpu", "MODEL": str(model),
           "COCO": str(tmp_path / "coco"), "OUT": str(tmp_path / "out"),
           "FINGERPRINT_LM_CACHE": str(tmp_path / "cache")}
    steps = 'sweep sweep.grid.act=none sweep.grid.case=none_c1; sweep'  # main()'s steps 2 and 3
    out = subprocess.run(["bash", "-c", f'source "{SWEEP_SCRIPT}"; set +e; {steps}'], capture_output=True,
                         text=True, cwd=ROOT, timeout=300, env=env)
    assert "no cluster here" in out.stderr, out.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.glob("submitted_*")) == ["submitted_0.sh", "submitted_1.sh"], out.stderr
    warm, grid = ((tmp_path / f"submitted_{i}.sh").read_text() for i in (0, 1))
    assert "--array" not in warm and "#SBATCH --gpus-per-node=1" in warm, warm  # one job, no array
    assert "#SBATCH --array=0-102%" in grid, grid
    assert "--partition=gpu" in grid and f"{tmp_path}/out/sd2_coco_collusion/.submitit/" in grid


def test_training_resumes_from_the_step_of_last_ckpt(tmp_path):
    run_dir = tmp_path / "run"
    first = compose_config(tmp_path, ["fingerprint_bits=8", "method.steps=10", ATTEMPTS])
    run(first)
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    before = _curve(run_dir)
    # the same command with a higher step budget, as a requeued job would run it
    metrics = run(compose_config(tmp_path, ["fingerprint_bits=8", "method.steps=20",
                                            ATTEMPTS]))
    assert (run_dir / "attempts.txt").read_text().split() == ["0", "10"]
    assert metrics["steps"] == 20
    assert metrics["base_vae_cached"] is True  # the base VAE was reused from the cache, not pretrained again
    after = _curve(run_dir)
    assert [int(row["step"]) for row in after] == list(range(1, 21))
    assert after[:10] == before  # the first ten rows came back from the checkpoint, not a re-run
    # control: resume=false starts again from step 0 in the same directory
    run(compose_config(tmp_path, ["fingerprint_bits=8", "method.steps=5", "resume=false",
                                  ATTEMPTS]))
    assert (run_dir / "attempts.txt").read_text().split() == ["0", "10", "0"]


def test_truncated_last_ckpt_is_a_checkpoint_error(tmp_path):
    # a job killed while saving leaves a partial file; the requeued job must say so, not crash
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"PK\x03\x04" + bytes(200))
    with pytest.raises(CheckpointError, match="not a complete checkpoint.*resume=false"):
        run(compose_config(tmp_path, ["fingerprint_bits=8", "method.steps=2"]))
    assert not (tmp_path / "run" / "metrics.json").exists()
    metrics = run(compose_config(tmp_path, ["fingerprint_bits=8", "method.steps=2", "resume=false"]))
    assert metrics["steps"] == 2


def test_cache_entry_written_concurrently_keeps_the_first_copy(tmp_path, monkeypatch):
    # two sweep jobs missing the same cache entry both build it; the second rename finds a
    # non-empty directory (simulated here) and must keep that copy instead of failing the job
    target = tmp_path / "base_vae" / "abc"
    real_replace = os.replace

    def another_job_wins(src, dst):
        Path(dst).mkdir(parents=True)
        (Path(dst) / "config.json").write_text("first")
        real_replace(src, dst)

    monkeypatch.setattr(cache.os, "replace", another_job_wins)
    with cache.atomic_directory(target) as tmp:
        (tmp / "config.json").write_text("second")
    assert (target / "config.json").read_text() == "first"
    assert [p.name for p in target.parent.iterdir()] == ["abc"]  # no temporary left behind


def test_a_directory_written_once_is_never_replaced(tmp_path, monkeypatch):
    """``overwrite=False`` (an issued copy): refused when the folder is there before, and when it
    appears while the block writes (the rename does not merge into it); no temporary stays."""
    target = tmp_path / "copies" / "alice"
    with cache.atomic_directory(target, overwrite=False) as tmp:
        (tmp / "config.json").write_text("first")
    with pytest.raises(FileExistsError, match="alice already exists"):
        with cache.atomic_directory(target, overwrite=False) as tmp:
            pass
    late = tmp_path / "copies" / "bob"
    with pytest.raises(FileExistsError, match="cannot create .*bob"):
        with cache.atomic_directory(late, overwrite=False) as tmp:
            (tmp / "config.json").write_text("mine")
            late.mkdir()
            (late / "config.json").write_text("theirs")
    assert (target / "config.json").read_text() == "first" and (late / "config.json").read_text() == "theirs"
    assert sorted(p.name for p in target.parent.iterdir()) == ["alice", "bob"]


def test_written_files_follow_the_umask_and_an_issued_copy_is_readable_whatever_it_is(tmp_path):
    """atomic_write_text's file is an ordinary file (mkstemp's is private); a copy folder is
    0755 with 0644 files even under umask 077 (it is handed out)."""
    previous = os.umask(0o022)
    try:
        cache.atomic_write_text(tmp_path / "metrics.json", "{}")
        assert (tmp_path / "metrics.json").stat().st_mode & 0o777 == 0o644
        os.umask(0o077)
        write_copy(tmp_path / "copies" / "alice", {"in_channels": 3}, {"w": torch.zeros(2)})
    finally:
        os.umask(previous)
    folder = tmp_path / "copies" / "alice"
    assert folder.stat().st_mode & 0o777 == 0o755
    assert {p.stat().st_mode & 0o777 for p in folder.iterdir()} == {0o644}


def test_append_jsonl_adds_whole_rows_after_the_old_ones(tmp_path):
    log = tmp_path / "results" / "probe.jsonl"
    cache.append_jsonl(log, {"arm": "a", "bit_acc": 0.5})
    cache.append_jsonl(log, *({"arm": arm} for arm in ("b", "c")))
    cache.append_jsonl(log)  # no rows: nothing written
    assert [json.loads(line)["arm"] for line in log.read_text().splitlines()] == ["a", "b", "c"]


def _pretrain_base_vae_once(tmp_path: Path) -> None:
    """Fill the cache before the sweep so its parallel jobs load the same base VAE."""
    cfg = compose_config(tmp_path, [])
    stages.prepare_base_vae(model_spec(cfg), cfg.paths.cache_dir, instantiate(cfg.data), quiet_trainer_factory(cfg))


@pytest.mark.slow
def test_submitit_local_sweep_is_requeued_into_the_same_dir_and_resumes(tmp_path):
    _pretrain_base_vae_once(tmp_path)
    # default sweep dir: <root>/outputs/multiruns/${now:...}, fixed when the sweep is submitted
    command = [
        sys.executable, "-m", "fingerprint_lm", "-m", "hydra/launcher=submitit_local", *DEBUG_TINY,
        f"paths.root_dir={tmp_path}", f"paths.cache_dir={tmp_path}/cache", "fingerprint_bits=8",
        # carrier: 20 steps of it read above chance (the check below); 20 of pnm, the default, do not
        "method=carrier", "method.steps=20", "method.detector_fit_samples=128", "seed=0,1",
        ATTEMPTS, "+callbacks.attempts.preempt_at=13",
    ]
    out = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    sweeps = list((tmp_path / "outputs" / "multiruns").iterdir())
    assert len(sweeps) == 1  # the requeued attempts did not open a directory of their own
    sweep = sweeps[0]
    for job in ("0", "1"):
        # preempted after 13 steps; requeued; resumed from the step-10 checkpoint; finished
        assert (sweep / job / "attempts.txt").read_text().split() == ["0", "10"], job
        metrics = json.loads((sweep / job / "metrics.json").read_text())
        assert metrics["steps"] == 20 and metrics["bit_acc"] > 0.5
        assert (sweep / job / "fingerprint_model" / "fingerprint.json").is_file()
        assert [int(row["step"]) for row in _curve(sweep / job)] == list(range(1, 21))
    # submitit's job folders (logs, pickles) are inside the sweep dir, one per job
    job_folders = [d for d in (sweep / ".submitit").iterdir() if list(d.glob("*_result.pkl"))]
    assert len(job_folders) == 2
    log_text = "".join(p.read_text() for p in (sweep / ".submitit").rglob("*_log.err"))
    assert log_text.count("Caught signal SIGUSR2") == 2 and "this job is preempted" in log_text
