"""Distributor workflow: issuing copies, loading them, attribution, tracing, bad input.

One tiny model is trained for the whole module (session fixture); three users are issued once
and shared by the read-only tests. Tests that write use their own registry under ``tmp_path``.

Statistics at this size: the tiny model has 32-bit codes and a registry of 3 users. Attribution
then reaches the default FPR 1e-6 (best corrected p-value 3 * 2**-32 = 7e-10; >= 30 of 32 bits
must match). Tracing cannot: its score is at most sqrt(32) = 5.66 and the threshold at 1e-6 is
sqrt(2 ln(3e6)) = 5.46, so the tracing tests use fpr 1e-3 (threshold 4.0). 16-bit codes would
not do for attribution at 1e-6 either (best p-value 3 * 2**-16 = 5e-5).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image
from safetensors import safe_open

from fingerprint_lm.distributor.attribution import attribute_images, read_images, trace_images
from fingerprint_lm.distributor.copies import (
    BIAS_MAP_NAME,
    WEIGHTS_NAME,
    BiasMapGroupNorm,
    copy_sha256,
    load_copy,
    personal_tensors,
    verify_copy,
    write_copy,
)
from fingerprint_lm.distributor.generation import held_out_images
from fingerprint_lm.errors import CheckpointError, ConfigError, DataError, RegistryError
from fingerprint_lm.models.act import derive_act_seed
from fingerprint_lm.models.checkpoint import load_fingerprint_model
from fingerprint_lm.registry.store import Registry
from fingerprint_lm.tasks import TASKS, run
from tests.conftest import ROOT, TINY_BITS, compose_config

BITS = TINY_BITS
SECRET = "test-secret-not-for-production"
USERS = ("alice", "bob", "carol")
TRACE_FPR = "1e-3"


def task(root: Path, checkpoint: Path, name: str, *overrides: str) -> dict:
    """Run one distributor task in-process on the registry and copies under ``root``."""
    cfg = compose_config(
        root, [f"fingerprint_bits={BITS}", f"task={name}", f"distributor.checkpoint={checkpoint}", *overrides]
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


@contextlib.contextmanager
def one_torch_thread():
    # 2 shared cores: a second OpenMP thread competing with other processes stalls these small
    # models (measured: training 104 s with 2 threads under load, ~10 s with one).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="session")
def checkpoint(tiny_checkpoint) -> Path:
    return tiny_checkpoint


@pytest.fixture(scope="session")
def issued(tmp_path_factory, checkpoint) -> Path:
    """A registry of alice, bob, carol (ACT all), and 16 images from bob's copy and from the base."""
    root = tmp_path_factory.mktemp("distributor")
    with pytest.MonkeyPatch.context() as env, one_torch_thread():
        env.setenv("FINGERPRINT_LM_SECRET", SECRET)
        for user in USERS:
            task(root, checkpoint, "issue", f"user_id={user}", "distributor.code_seed=0")
    with one_torch_thread():
        task(root, checkpoint, "generate", f"copy={root / 'copies' / 'bob'}", f"out={root / 'bob_images'}")
        task(root, checkpoint, "generate", "copy=base", f"out={root / 'base_images'}")
    return root


@pytest.fixture
def secret(monkeypatch):
    monkeypatch.setenv("FINGERPRINT_LM_SECRET", SECRET)
    return SECRET


# -- config -----------------------------------------------------------------------------------------
def test_config_groups_and_defaults(tmp_path):
    cfg = compose_config(tmp_path)
    assert cfg.act.type == "all" and cfg.act.scale_min == 0.25 and cfg.act.scale_max == 4.0
    assert cfg.distributor.registry == f"{tmp_path}/registry/registry.sqlite"
    assert cfg.distributor.copies_dir == f"{tmp_path}/copies"
    assert cfg.distributor.checkpoint is None and cfg.distributor.secret_file is None
    assert cfg.distributor.secret_env == "FINGERPRINT_LM_SECRET"
    assert cfg.distributor.fpr == 1e-6 and cfg.distributor.min_distance == 8
    for act_type in ("none", "permute", "scale", "sign", "all"):
        assert compose_config(tmp_path, [f"act={act_type}"]).act.type == act_type
    assert set(TASKS) >= {"issue", "users", "attribute", "trace", "generate", "verify"}


# -- issuing ----------------------------------------------------------------------------------------
def test_end_to_end_issue_generate_attribute(issued, checkpoint):
    users = task(issued, checkpoint, "users")
    assert [u["user_id"] for u in users["users"]] == list(USERS)
    for row in users["users"]:
        assert row["act_type"] == "all"
        assert row["copy_sha256"] == copy_sha256(issued / "copies" / row["user_id"])
    assert json.loads((issued / "run" / "users.json").read_text())["n_users"] == 3

    # images from bob's copy (decoded through load_copy) are attributed to bob at the default FPR
    result = task(issued, checkpoint, "attribute", f"images={issued / 'bob_images'}")
    assert len(result["images"]) == 16 and result["match_threshold"] is not None
    for row in result["images"]:
        assert row["user_id"] == "bob" and row["accused"], row
        assert row["p_value"] <= 1e-6
        assert row["matching_bits"] >= result["match_threshold"]
        assert len(row["bits"]) == BITS and set(row["bits"]) <= {"0", "1"}
    saved = json.loads((issued / "run" / "attribute.json").read_text())
    assert saved["images"][0].keys() >= {"image", "bits", "user_id", "matching_bits", "p_value", "accused"}

    # no image from the base decoder is accused
    base = task(issued, checkpoint, "attribute", f"images={issued / 'base_images'}")
    assert not any(row["accused"] for row in base["images"])
    assert all(row["user_id"] is None for row in base["images"])


def test_trace_ranks_the_source_first_and_accuses_nobody_for_base_images(issued, checkpoint):
    result = task(issued, checkpoint, "trace", f"images={issued / 'bob_images'}", f"distributor.fpr={TRACE_FPR}")
    suspects = result["suspects"]
    assert [s["user_id"] for s in suspects][:1] == ["bob"] and suspects[0]["accused"]
    assert not any(s["accused"] for s in suspects[1:])
    assert suspects[0]["score"] >= result["threshold"] > suspects[1]["score"]
    assert suspects[0].keys() >= {"user_id", "score", "accused", "p_value_bound"}
    base = task(issued, checkpoint, "trace", f"images={issued / 'base_images'}", f"distributor.fpr={TRACE_FPR}")
    assert not any(s["accused"] for s in base["suspects"])


def test_copy_holds_no_private_tensors_and_no_secret(issued, checkpoint):
    model = load_fingerprint_model(checkpoint)
    stock_keys = set(AutoencoderKL.from_config(model.vae.config).state_dict())
    private = ("mapping", "affine_heads", "carrier", "extractor", "linear_gain", "cnn")
    for user in USERS:
        folder = issued / "copies" / user
        assert sorted(p.name for p in folder.iterdir()) == ["config.json", WEIGHTS_NAME, BIAS_MAP_NAME]
        with safe_open(str(folder / WEIGHTS_NAME), "pt") as handle:
            keys = set(handle.keys())
        assert keys == stock_keys
        assert not any(word in key for key in keys for word in private)
        with safe_open(str(folder / BIAS_MAP_NAME), "pt") as handle:
            assert list(handle.keys()) == ["decoder.conv_norm_out.bias_map"]
    # the secret appears in no file the distributor wrote (registry, copies, JSON outputs)
    for path in issued.rglob("*"):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


def test_load_copy_reproduces_the_pnm_decoder(issued, checkpoint):
    """load_copy == pnm(latents, code) (float32, <= 1e-5): exactly for ACT none/permute/sign at the
    stock GroupNorm eps; ACT scale/all are exact only up to eps (GN(s x) normalises by
    sqrt(var + eps / s^2)), so they are compared at eps 0 and bounded at the stock eps."""
    model = load_fingerprint_model(checkpoint)
    with torch.no_grad():
        latents = model.vae.encode(held_out_images(16, 4, seed=1)).latent_dist.mode()
    with Registry(issued / "registry" / "registry.sqlite", BITS) as reg:
        code = reg.get("bob")["code"]
    bits = torch.as_tensor(code).long()[None]
    seed = derive_act_seed(SECRET.encode(), "bob")

    def set_eps(module, eps):
        for norm in module.modules():
            if isinstance(norm, torch.nn.GroupNorm):
                norm.eps = eps

    with torch.no_grad():
        reference = model.pnm(latents, bits)  # post_quant_conv included, as in AutoencoderKL.decode
        for act_type in ("none", "permute", "sign", "scale", "all"):
            state, bias_map, site = personal_tensors(model, code, act_type, seed)
            folder = issued / "scratch" / act_type
            write_copy(folder, model.vae.config, state, bias_map, site)
            vae = load_copy(folder)
            assert isinstance(vae.decoder.conv_norm_out, BiasMapGroupNorm)
            assert set(vae.state_dict()) == set(AutoencoderKL.from_pretrained(folder).state_dict())
            diff = (vae.decode(latents).sample - reference).abs().max().item()
            assert diff <= (1e-5 if act_type in ("none", "permute", "sign") else 1e-3), (act_type, diff)

        # the session's copy of bob (ACT all, written by task=issue) at eps 0: exact to rounding
        set_eps(model.vae, 0.0)
        exact_reference = model.pnm(latents, bits)
        vae = load_copy(issued / "copies" / "bob")
        set_eps(vae, 0.0)
        assert (vae.decode(latents).sample - exact_reference).abs().max().item() <= 1e-5

        # stock from_pretrained reproduces the main path: the PNM decoder without the bias map
        stock = AutoencoderKL.from_pretrained(issued / "copies" / "bob").eval()
        set_eps(stock, 0.0)
        main_path = model.pnm(latents, bits, carriers=False)
        assert (stock.decode(latents).sample - main_path).abs().max().item() <= 1e-5
        assert (stock.decode(latents).sample - exact_reference).abs().max().item() > 1e-2  # the map matters


def test_act_type_is_recorded_and_the_secret_sets_the_copy(tmp_path, checkpoint, monkeypatch):
    # no secret needed without ACT
    monkeypatch.delenv("FINGERPRINT_LM_SECRET", raising=False)
    task(tmp_path / "a", checkpoint, "issue", "user_id=dora", "act=none")
    monkeypatch.setenv("FINGERPRINT_LM_SECRET", SECRET)
    task(tmp_path / "a", checkpoint, "issue", "user_id=erin", "act=permute")
    with Registry(tmp_path / "a" / "registry" / "registry.sqlite", BITS) as reg:
        assert reg.get("dora")["act_type"] == "none" and reg.get("erin")["act_type"] == "permute"

    # same code seed and secret (from the environment or a file): the same copy; another secret: not
    monkeypatch.delenv("FINGERPRINT_LM_SECRET")
    secret_file = tmp_path / "secret.txt"
    secret_file.write_text(SECRET + "\n")
    shas = []
    for name, secret_value in (("b", SECRET), ("c", None), ("d", "another-secret")):
        if secret_value is None:
            extra = [f"distributor.secret_file={secret_file}"]
        else:
            monkeypatch.setenv("FINGERPRINT_LM_SECRET", secret_value)
            extra = []
        shas.append(task(tmp_path / name, checkpoint, "issue", "user_id=dora", "distributor.code_seed=7",
                         *extra)["copy_sha256"])
        monkeypatch.delenv("FINGERPRINT_LM_SECRET", raising=False)
    assert shas[0] == shas[1] != shas[2]


# -- bad input ----------------------------------------------------------------------------------------
def test_bad_issue_requests_change_nothing(tmp_path, checkpoint, secret, monkeypatch):
    root = tmp_path / "r"
    task(root, checkpoint, "issue", "user_id=alice")
    before = registry_state(root)
    copy_before = copy_sha256(root / "copies" / "alice")
    with pytest.raises(RegistryError, match="duplicate user 'alice'"):
        task(root, checkpoint, "issue", "user_id=alice")
    with pytest.raises(RegistryError, match="invalid user id"):
        task(root, checkpoint, "issue", "user_id=../evil")
    with pytest.raises(ConfigError, match="task=issue needs user_id"):
        task(root, checkpoint, "issue")
    with pytest.raises(RegistryError, match="created with min_distance 8, not 4"):
        task(root, checkpoint, "issue", "user_id=zoe", "distributor.min_distance=4")
    monkeypatch.delenv("FINGERPRINT_LM_SECRET")
    with pytest.raises(ConfigError, match="no ACT secret: set the environment variable FINGERPRINT_LM_SECRET"):
        task(root, checkpoint, "issue", "user_id=zoe")
    with pytest.raises(ConfigError, match="cannot read the ACT secret file"):
        task(root, checkpoint, "issue", "user_id=zoe", f"distributor.secret_file={tmp_path / 'missing'}")
    # registration failing after the copy was written (e.g. a concurrent issue): the copy goes too
    def clash(*args, **kwargs):
        raise RegistryError("duplicate user 'zoe'")

    monkeypatch.setattr(Registry, "register", clash)
    monkeypatch.setenv("FINGERPRINT_LM_SECRET", SECRET)
    with pytest.raises(RegistryError, match="duplicate user 'zoe'"):
        task(root, checkpoint, "issue", "user_id=zoe")
    monkeypatch.undo()
    assert registry_state(root) == before
    assert copy_sha256(root / "copies" / "alice") == copy_before
    assert not any(p.name.startswith(".") for p in (root / "copies").iterdir())  # no temporary leftovers

    with pytest.raises(ConfigError, match="16 bits"):  # a code of the wrong length
        personal_tensors(load_fingerprint_model(checkpoint), np.zeros(16, dtype=np.uint8))

    # a registry of another code length than the checkpoint
    other = tmp_path / "other"
    (other / "registry").mkdir(parents=True)
    Registry(other / "registry" / "registry.sqlite", 24).close()
    before = registry_state(other)
    monkeypatch.setenv("FINGERPRINT_LM_SECRET", SECRET)
    with pytest.raises(RegistryError, match="holds 24-bit codes, not 32"):
        task(other, checkpoint, "issue", "user_id=zoe")
    assert registry_state(other) == before == (0, before[1], [])


def test_unknown_user_and_altered_copies_are_rejected(issued, checkpoint, tmp_path):
    before = registry_state(issued)
    copy = tmp_path / "bob"
    shutil.copytree(issued / "copies" / "bob", copy)
    with Registry(issued / "registry" / "registry.sqlite", BITS) as reg:
        assert verify_copy(copy, reg, "bob")["ok"]
        assert task(issued, checkpoint, "verify", f"copy={copy}", "user_id=bob")["ok"]
        with pytest.raises(RegistryError, match="unknown user 'zed'"):
            verify_copy(copy, reg, "zed")
        with pytest.raises(CheckpointError, match="does not match the registered hash of 'alice'"):
            verify_copy(copy, reg, "alice")  # someone else's copy
        expected = reg.get("bob")["copy_sha256"]

        weights = copy / WEIGHTS_NAME
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0x01  # one flipped bit inside a tensor: loads fine, hash differs
        weights.write_bytes(bytes(data))
        with pytest.raises(CheckpointError, match="truncated or altered"):
            verify_copy(copy, reg, "bob")
        with pytest.raises(CheckpointError, match="does not match the expected hash"):
            load_copy(copy, expected_sha256=expected)

        weights.write_bytes(bytes(data[: len(data) // 3]))  # truncated
        with pytest.raises(CheckpointError, match="truncated or altered"):
            verify_copy(copy, reg, "bob")
        with pytest.raises(CheckpointError, match="cannot load VAE"):
            load_copy(copy)

        shutil.copytree(issued / "copies" / "bob", tmp_path / "bob2")
        (tmp_path / "bob2" / BIAS_MAP_NAME).unlink()  # the carrier removed
        with pytest.raises(CheckpointError, match="truncated or altered"):
            verify_copy(tmp_path / "bob2", reg, "bob")
    with pytest.raises(CheckpointError, match="truncated or altered"):
        task(issued, checkpoint, "verify", f"copy={copy}", "user_id=bob")
    assert registry_state(issued) == before


def test_image_reading_converts_modes_and_rejects_bad_files(issued, checkpoint, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    bob = Image.open(issued / "bob_images" / "img_0000.png")
    bob.convert("RGBA").save(folder / "a_rgba.png")  # opaque RGBA: same pixels
    bob.convert("L").save(folder / "b_gray.png")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (19, 23, 3), dtype=np.uint8)).save(folder / "c_odd.png")
    (folder / "notes.txt").write_text("not an image; ignored")
    images = read_images(folder, min_size=16)
    assert [Path(name).name for name, _ in images] == ["a_rgba.png", "b_gray.png", "c_odd.png"]
    assert [tuple(t.shape) for _, t in images] == [(3, 16, 16), (3, 16, 16), (3, 19, 23)]
    assert float(images[0][1].min()) >= -1 and float(images[0][1].max()) <= 1

    model = load_fingerprint_model(checkpoint)
    with Registry(issued / "registry" / "registry.sqlite", BITS) as reg:
        result = attribute_images(model.extractor, reg, images[:1], fpr=1e-6)
        assert result["images"][0]["user_id"] == "bob"  # RGBA of bob's image still reads as bob
        assert len(trace_images(model.extractor, reg, images, fpr=1e-3)["suspects"]) == 3

    before = registry_state(issued)
    small = tmp_path / "small.png"
    Image.new("RGB", (8, 12)).save(small)
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        (small, "8x12: smaller than the fingerprint tile \\(16x16\\)"),
        (corrupt, "cannot read image"),
        (empty, "no image files"),
        (tmp_path / "missing", "no such image file or folder"),
    ]
    for name in ("attribute", "trace"):
        for path, message in cases:
            with pytest.raises(DataError, match=message):
                task(issued, checkpoint, name, f"images={path}")
        with pytest.raises(ConfigError, match=f"task={name} needs images="):
            task(issued, checkpoint, name)
    with pytest.raises(RegistryError, match="no registry at"):
        task(tmp_path / "nothing", checkpoint, "attribute", f"images={issued / 'bob_images'}")
    assert registry_state(issued) == before
    assert not (tmp_path / "nothing" / "registry").exists()


def cli(*overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "fingerprint_lm", "logger=none", *overrides],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env=env,
    )


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, checkpoint, issued):
    env = {k: v for k, v in os.environ.items() if k != "FINGERPRINT_LM_SECRET"}
    env["OMP_NUM_THREADS"] = "1"
    result = cli("task=issue", "user_id=alice", f"paths.root_dir={tmp_path}",
                 f"distributor.checkpoint={checkpoint}", env=env)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]  # one line
    assert result.stderr.startswith("error: no ACT secret: set the environment variable FINGERPRINT_LM_SECRET")
    assert not (tmp_path / "registry").exists() and not (tmp_path / "copies").exists()

    # after the model is loaded too (no library warning may add lines)
    empty = tmp_path / "empty"
    empty.mkdir()
    before = registry_state(issued)
    result = cli("task=attribute", f"images={empty}", f"paths.root_dir={tmp_path}",
                 f"distributor.registry={issued / 'registry' / 'registry.sqlite'}",
                 f"distributor.checkpoint={checkpoint}", env=env)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == f"error: no image files (.png, .jpg, .jpeg, .webp, .bmp, .tif, .tiff, .gif) in folder {empty}"
    assert registry_state(issued) == before
