"""Shared fixtures: configs composed with hydra.compose, shrunk, with paths under tmp_path."""

from __future__ import annotations

import hashlib
import os
import sqlite3
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf, open_dict

import fingerprint_lm  # noqa: F401  (registers the OmegaConf resolvers the configs use)
from fingerprint_lm.tasks import run
from fingerprint_lm.tasks.compose import compose_config as compose_package_config

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
# Tiny models: one thread is faster than two (no OpenMP hand-off), and immune to oversubscription.
torch.set_num_threads(1)

# conf/debug/tiny.yaml: a 2-level AutoencoderKL (downscale factor 2) at 16 px, a few steps and images,
# no logger. The same overlay a user runs with `debug=tiny`, so tests and users shrink runs alike.
DEBUG_TINY = ["debug=tiny"]


def compose_config(tmp_path: Path, overrides: list[str] = (), tiny: bool = True):
    """The package's composition (``tasks/compose.py``, as the entry point composes), shrunk by
    ``debug=tiny`` unless ``tiny=False``, with every output and cache under ``tmp_path``."""
    cfg = compose_package_config([*(DEBUG_TINY if tiny else []), *overrides], output_dir=tmp_path / "run")
    with open_dict(cfg):
        cfg.paths.root_dir = str(tmp_path)
        cfg.paths.cache_dir = str(tmp_path / "cache")
        cfg.paths.export_dir = str(tmp_path / "export")
        cfg.hydra.runtime.output_dir = str(tmp_path / "run")
        cfg.hydra.runtime.cwd = str(tmp_path)
    OmegaConf.resolve(cfg.paths)
    with open_dict(cfg):  # the composed config is in struct mode, which forbids deletion
        del cfg["hydra"]
    return cfg


@pytest.fixture(scope="session")
def default_cfg(tmp_path_factory):
    """The composed default config (no overrides, no debug overlay), once for every test that only
    reads it. Tests must not modify it (compose their own with ``compose_config`` for that)."""
    cfg = compose_config(tmp_path_factory.mktemp("default_cfg"), [], tiny=False)
    OmegaConf.set_readonly(cfg, True)
    return cfg


@pytest.fixture(scope="session")
def sweep_recipe_cfg(tmp_path_factory):
    """``+experiment=collusion_sweep`` composed as Hydra's sweeper sees it (with its ``hydra`` node: the
    sweeper and its grid axes), read-only, for the tests that only read the recipe."""
    cfg = compose_package_config(["+experiment=collusion_sweep"], output_dir=tmp_path_factory.mktemp("sweep_recipe"))
    OmegaConf.set_readonly(cfg, True)
    return cfg


@pytest.fixture
def tiny_cfg(tmp_path):
    return lambda overrides=(): compose_config(tmp_path, list(overrides))


TINY_BITS = 32  # the shared tiny model's code length: attribution at fpr 1e-6 needs >= 30 of 32 bits


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """One `debug=tiny` carrier model with 32-bit codes, trained once for every test module that
    needs a trained checkpoint (distributor, sweep). Carrier, not the default pnm: its carriers
    are read from step 0, so a 20-step model attributes, which the pipeline's tests need; pnm's
    own tests train or load pnm models."""
    metrics = run(compose_config(tmp_path_factory.mktemp("tiny_train"), [f"fingerprint_bits={TINY_BITS}",
                                                                        "method=carrier"]))
    assert metrics["bit_acc"] > 0.95  # the carriers are read from step 0; attribution needs it
    return Path(metrics["checkpoint"])


# -- the distributor's shared state: three users issued once from the tiny model ------------------
SECRET = "test-secret-not-for-production"
USERS = ("alice", "bob", "carol")
TRACE_FPR = "1e-3"


def task(root: Path, checkpoint: Path, name: str, *overrides: str) -> dict:
    """Run one distributor task in-process on the registry and copies under ``root``."""
    cfg = compose_config(
        root, [f"fingerprint_bits={TINY_BITS}", f"task={name}", f"distributor.checkpoint={checkpoint}", *overrides]
    )
    return run(cfg)


def registry_state(root: Path) -> tuple[int, str | None, list[str]]:
    """(rows, sha256 of the registry file, copies present): what a failed command must not change."""
    path = root / "registry" / "registry.sqlite"
    rows, digest = 0, None
    if path.is_file():
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as conn:
            rows = conn.execute("SELECT COUNT(*) FROM users").fetchone()[0]
    copies = root / "copies"
    return rows, digest, sorted(p.name for p in copies.iterdir()) if copies.is_dir() else []


@pytest.fixture(scope="session")
def checkpoint(tiny_checkpoint) -> Path:
    return tiny_checkpoint


@pytest.fixture(scope="session")
def issued(tmp_path_factory, checkpoint) -> Path:
    """A registry of alice, bob, carol (ACT all), and 16 images from bob's copy and from the base."""
    root = tmp_path_factory.mktemp("distributor")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("FINGERPRINT_LM_SECRET", SECRET)
        for user in USERS:
            task(root, checkpoint, "issue", f"user_id={user}", "distributor.code_seed=0")
    task(root, checkpoint, "generate", f"copy={root / 'copies' / 'bob'}", f"out={root / 'bob_images'}")
    task(root, checkpoint, "generate", "copy=base", f"out={root / 'base_images'}")
    return root


@pytest.fixture
def secret(monkeypatch):
    monkeypatch.setenv("FINGERPRINT_LM_SECRET", SECRET)
    return SECRET
