"""Lightning DDP on CPU: two processes (gloo), each training on different images.

The proof that gradients are synchronised: on the first step every rank also replays its own
batch through a copy of the module outside DDP (a single process, same RNG state) and saves that
local gradient; the gradient the optimizer then steps with must be the average of the two ranks'
local gradients, the same on both ranks, and unlike either rank's own. Without the all-reduce it
would equal the local one, so the test cannot pass with sync off. The parameters at the end must
also be identical across ranks, and only the main process (global rank 0) writes outputs.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch.strategies import DDPStrategy
from omegaconf import open_dict

from fingerprint_lm.lit import stages
from fingerprint_lm.tasks import run
from fingerprint_lm.tasks.train import model_spec
from tests.conftest import DEBUG_TINY, ROOT, compose_config

STEPS = 3


def _trainable(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def _grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


class _RecordingOptimizer:
    """Stands in for the optimizer of a replayed manual-optimisation step: keeps the gradient."""

    def __init__(self, module: torch.nn.Module):
        self.module, self.grads = module, None

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.module.parameters():
            p.grad = None

    def step(self) -> None:
        self.grads = _grads(self.module)


def local_gradient(pl_module: L.LightningModule, batch: dict) -> dict[str, torch.Tensor]:
    """The gradient of one training step on ``batch`` alone, computed in this process on a copy
    of the module that no DDP wrapper or Trainer touches (pickling drops the Trainer)."""
    replica = copy.deepcopy(pl_module)
    replica.log = replica.log_dict = lambda *args, **kwargs: None
    replica.manual_backward = lambda loss, *args, **kwargs: loss.backward()
    if replica.automatic_optimization:
        replica.zero_grad(set_to_none=True)
        replica.training_step(batch, 0).backward()
        return _grads(replica)
    optimizer = _RecordingOptimizer(replica)
    replica.optimizers = lambda: optimizer
    replica.training_step(batch, 0)
    return optimizer.grads


class GradientProbe(L.Callback):
    """Test-only: per rank, saves the first step's batch, local and synchronised gradients, and
    the trainable parameters before the first and after the last step, to ``out_dir/rank{r}.pt``."""

    def __init__(self, out_dir: str):
        self.out_dir = Path(out_dir)
        self.first: dict | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self.first is not None:
            return
        rng = torch.get_rng_state()
        local = local_gradient(pl_module, batch)
        torch.set_rng_state(rng)  # the real step draws the same fingerprints and augmentations
        self.first = {"images": batch["image"].clone(), "local": local, "start": _trainable(pl_module)}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if "synced" not in self.first:
            self.first["synced"] = _grads(pl_module)

    def on_train_end(self, trainer, pl_module):
        self.out_dir.mkdir(parents=True, exist_ok=True)
        record = {**self.first, "end": _trainable(pl_module), "world_size": trainer.world_size,
                  "steps": trainer.global_step}
        torch.save(record, self.out_dir / f"rank{trainer.global_rank}.pt")


def assert_gradients_were_averaged(probe_dir: Path) -> None:
    ranks = [torch.load(probe_dir / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    assert sorted(p.name for p in probe_dir.iterdir()) == ["rank0.pt", "rank1.pt"]
    assert all(r["world_size"] == 2 for r in ranks)
    # each rank trained on different images, from the same starting parameters
    assert not torch.allclose(ranks[0]["images"], ranks[1]["images"])
    for name, value in ranks[0]["start"].items():
        assert torch.equal(value, ranks[1]["start"][name]), name
    local0, local1 = ranks[0]["local"], ranks[1]["local"]
    synced = ranks[0]["synced"]
    assert synced.keys() == local0.keys() == local1.keys() == ranks[1]["synced"].keys()
    assert len(synced) > 0
    differs = 0
    for name in synced:
        assert torch.allclose(synced[name], ranks[1]["synced"][name], rtol=0, atol=1e-7), name
        expected = (local0[name] + local1[name]) / 2
        scale = expected.abs().max().clamp_min(1e-8)
        assert torch.allclose(synced[name], expected, rtol=1e-4, atol=1e-5 * scale), (
            name, (synced[name] - expected).abs().max().item(), scale.item())
        differs += int((local0[name] - local1[name]).abs().max() > 1e-3 * scale)
    # the ranks' own gradients disagree on most tensors, so "synced == average" is not "synced == local"
    assert differs >= len(synced) // 2, (differs, len(synced))
    # after the run the replicas are still one model, and it moved
    for name, value in ranks[0]["end"].items():
        assert torch.equal(value, ranks[1]["end"][name]), name
    assert any(not torch.equal(ranks[0]["end"][n], ranks[0]["start"][n]) for n in ranks[0]["end"])


def _ddp_cfg(tmp_path: Path, extra=()):
    # carrier, the pipeline tests' method: what is checked is the strategy's gradient averaging,
    # and pnm trains through the same FingerprintModule (its warm-down needs a real optimizer's
    # param_groups, which the replayed step's stand-in does not have)
    cfg = compose_config(tmp_path, ["method=carrier", "trainer=ddp_sim", "fingerprint_bits=8", f"method.steps={STEPS}",
                                    "model.pretrain.steps=4", "method.detector_fit_samples=128",
                                    "callbacks.model_checkpoint.every_n_train_steps=2", *extra])
    with open_dict(cfg):
        cfg.callbacks.gradient_probe = {"_target_": f"{__name__}.GradientProbe", "out_dir": str(tmp_path / "probe")}
    return cfg


def _cache_base_vae(cfg) -> None:
    """Pretrain the base VAE in this process first (the cache key ignores the trainer), so the DDP
    run spawns its two ranks once, for the fingerprint stage."""
    single = copy.deepcopy(cfg)
    with open_dict(single):
        single.trainer.strategy = "auto"
        single.trainer.devices = 1
    datamodule = instantiate(single.data)
    stages.prepare_base_vae(
        model_spec(single), single.paths.cache_dir, datamodule,
        lambda **kw: instantiate(single.trainer, **{"logger": False, **kw}),
    )


def test_fingerprint_stage_averages_gradients_across_ranks_and_rank_zero_writes(tmp_path):
    cfg = _ddp_cfg(tmp_path)
    _cache_base_vae(cfg)
    metrics = run(cfg)

    # worst-case step (two backward passes, manual optimisation): both are all-reduced
    assert cfg.method.train.wc_steps == 1
    assert_gradients_were_averaged(tmp_path / "probe")
    # the main process got rank 0's state back: step count and curve, and wrote everything once
    run_dir = tmp_path / "run"
    assert metrics["steps"] == STEPS
    assert json.loads((run_dir / "metrics.json").read_text())["steps"] == STEPS
    curve = (run_dir / "training_curve.csv").read_text().splitlines()
    assert [int(line.split(",")[0]) for line in curve[1:]] == list(range(1, STEPS + 1))
    assert [p.relative_to(tmp_path) for p in tmp_path.rglob("metrics.json")] == [Path("run/metrics.json")]
    assert len(list(tmp_path.rglob("fingerprint.json"))) == 1
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["last.ckpt"]
    assert not [p for p in tmp_path.rglob("*") if "rank1" in p.name and p.parent.name != "probe"]


class NoAllReduceDDP(DDPStrategy):
    """Negative control: DDP whose gradient all-reduce is a no-op (each rank keeps its own)."""

    def _register_ddp_hooks(self) -> None:
        def keep_local(state, bucket):
            future = torch.futures.Future()
            future.set_result(bucket.buffer())
            return future

        self.model.register_comm_hook(None, keep_local)


def test_the_gradient_check_fails_when_ranks_do_not_synchronise(tmp_path):
    cfg = _ddp_cfg(tmp_path)
    _cache_base_vae(cfg)
    with open_dict(cfg):
        cfg.trainer.strategy = {"_target_": f"{__name__}.NoAllReduceDDP", "start_method": "spawn",
                                "find_unused_parameters": True}
    run(cfg)
    with pytest.raises(AssertionError):
        assert_gradients_were_averaged(tmp_path / "probe")


@pytest.mark.slow
def test_base_vae_stage_averages_gradients_across_ranks(tmp_path):
    # automatic optimisation: Lightning's DDP wrapper does the all-reduce
    cfg = _ddp_cfg(tmp_path)
    probe = GradientProbe(str(tmp_path / "probe"))
    vae, facts = stages.prepare_base_vae(
        model_spec(cfg), cfg.paths.cache_dir, instantiate(cfg.data),
        lambda **kw: instantiate(cfg.trainer, **{**kw, "callbacks": [probe]}),
    )
    assert_gradients_were_averaged(tmp_path / "probe")
    assert facts["base_vae_cached"] is False
    # the cache holds the weights rank 0 trained, written once
    assert len(list((tmp_path / "cache" / "base_vae").iterdir())) == 1
    end = torch.load(tmp_path / "probe" / "rank0.pt", weights_only=False)["end"]
    for name, value in vae.named_parameters():
        assert torch.equal(value.detach(), end[f"vae.{name}"]), name


@pytest.mark.slow
def test_strategy_ddp_runs_the_script_on_every_rank_and_rank_zero_writes(tmp_path):
    # strategy=ddp (like SLURM) re-runs the command for rank 1: every rank executes run(); the
    # outputs and the base VAE cache must still be written once. Carrier dropout leaves parameters
    # unused in some steps: the find_unused_parameters strategy of conf/trainer/ddp.yaml copes.
    command = [
        sys.executable, "-m", "fingerprint_lm", *DEBUG_TINY, "method=carrier", "trainer=ddp_sim",
        "trainer.strategy=ddp_find_unused_parameters_true", "method.train.carrier_dropout=0.5",
        "fingerprint_bits=8", f"method.steps={STEPS + 2}", "model.pretrain.steps=4",
        "method.detector_fit_samples=128", f"paths.root_dir={tmp_path}", f"hydra.run.dir={tmp_path}/run",
    ]
    env = {"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin", "WANDB_MODE": "offline"}
    out = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "GLOBAL_RANK: 1" in out.stderr + out.stdout  # the second rank really ran
    assert (tmp_path / "run" / "train_ddp_process_1.log").is_file()
    assert [p.relative_to(tmp_path) for p in tmp_path.rglob("metrics.json")] == [Path("run/metrics.json")]
    assert len(list(tmp_path.rglob("fingerprint.json"))) == 1
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["steps"] == STEPS + 2
    # carrier dropout left the carriers out of some steps' graphs (plain DDP would have failed)
    carriers = [line.split(",")[-1] for line in (tmp_path / "run" / "training_curve.csv").read_text().split()[1:]]
    assert "0" in carriers and "1" in carriers
    cached = list((tmp_path / ".cache" / "fingerprint_lm" / "base_vae").iterdir())
    assert len(cached) == 1 and not cached[0].name.startswith(".")
