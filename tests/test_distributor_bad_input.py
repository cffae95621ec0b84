"""The distributor's commands on bad input: a failed command changes nothing (registry, copies),
altered or foreign copies are refused, unreadable images are named, and the console gets one
``error:`` line and exit code 2."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fingerprint_lm.distributor.attribution import attribute_images, read_images, trace_images
from fingerprint_lm.distributor.copies import (
    BIAS_MAP_NAME,
    CONFIG_NAME,
    LEGACY_HASHED_FILES,
    WEIGHTS_NAME,
    check_copy_hash,
    copy_sha256,
    load_copy,
    personal_tensors,
    verify_copy,
)
from fingerprint_lm.errors import CheckpointError, ConfigError, DataError, RegistryError
from fingerprint_lm.models.checkpoint import load_fingerprint_model
from fingerprint_lm.registry.store import Registry
from tests.conftest import ROOT, SECRET, TINY_BITS, registry_state, task
from tests.console import run_console

BITS = TINY_BITS


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


@pytest.mark.parametrize("edit", ["act_fn", "scaling_factor", "removed"])
def test_an_edited_config_json_is_an_altered_copy(issued, checkpoint, tmp_path, edit):
    """config.json holds no weights, but another activation or latent scaling changes what the
    weights compute: the copy's hash covers it."""
    copy = tmp_path / "bob"
    shutil.copytree(issued / "copies" / "bob", copy)
    config_file = copy / CONFIG_NAME
    config = json.loads(config_file.read_text())
    assert edit == "removed" or config[edit] not in ("relu", 0)  # the edit changes the value
    if edit == "removed":
        config_file.unlink()
    else:
        config[edit] = "relu" if edit == "act_fn" else config[edit] / 2
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    with Registry(issued / "registry" / "registry.sqlite", BITS) as reg:
        expected = reg.get("bob")["copy_sha256"]
        with pytest.raises(CheckpointError, match="registered hash of 'bob' \\(truncated or altered\\)"):
            verify_copy(copy, reg, "bob")
    with pytest.raises(CheckpointError, match="truncated or altered"):
        load_copy(copy, expected_sha256=expected)
    with pytest.raises(CheckpointError, match="truncated or altered"):
        task(issued, checkpoint, "verify", f"copy={copy}", "user_id=bob")


def test_a_hash_registered_before_config_json_was_hashed_still_verifies(issued, caplog):
    """Registries written before config.json was hashed keep working, with a warning."""
    copy = issued / "copies" / "bob"
    legacy = copy_sha256(copy, LEGACY_HASHED_FILES)
    assert legacy != copy_sha256(copy)
    with caplog.at_level("WARNING"):
        assert check_copy_hash(copy, legacy) == legacy
    assert "config.json not checked" in caplog.text
    with pytest.raises(CheckpointError, match="truncated or altered"):
        check_copy_hash(copy, "0" * 64)


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
        (small, "8x12: smaller than the extractor reads \\(16x16\\)"),
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
    """``python -m fingerprint_lm logger=none *overrides`` (in this interpreter: tests/console.py)."""
    return run_console(["logger=none", *overrides], cwd=ROOT, env=env)


def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, checkpoint, issued):
    env = {k: v for k, v in os.environ.items() if k != "FINGERPRINT_LM_SECRET"}
    env["OMP_NUM_THREADS"] = "1"
    result = cli("task=issue", "user_id=alice", f"paths.root_dir={tmp_path}",
                 f"distributor.checkpoint={checkpoint}", env=env)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]  # one line
    assert result.stderr.startswith("error: no ACT secret: set the environment variable FINGERPRINT_LM_SECRET")
    assert not (tmp_path / "registry").exists() and not (tmp_path / "copies").exists()
    assert not (tmp_path / "outputs").exists()  # nor Hydra's job folder: the task wrote nothing

    # after the model is loaded too (no library warning may add lines)
    empty = tmp_path / "empty"
    empty.mkdir()
    before = registry_state(issued)
    result = cli("task=attribute", f"images={empty}", f"paths.root_dir={tmp_path}",
                 f"distributor.registry={issued / 'registry' / 'registry.sqlite'}",
                 f"distributor.checkpoint={checkpoint}", env=env)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == ("error: no image files (.png, .jpg, .jpeg, .webp, .bmp, .tif, .tiff, .gif) "
                                     f"in folder {empty}")
    assert registry_state(issued) == before
    assert not (tmp_path / "outputs").exists()


def test_cli_refuses_an_altered_checkpoint_in_one_line(tmp_path, checkpoint, issued):
    """A checkpoint whose weights were altered after it was written: every distributor command
    that loads it ends with one error line and exit 2, and writes nothing."""
    damaged = tmp_path / "ckpt"
    shutil.copytree(checkpoint, damaged)
    weights = damaged / "fingerprint.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    env = {**os.environ, "FINGERPRINT_LM_SECRET": SECRET, "OMP_NUM_THREADS": "1"}
    before = registry_state(issued)
    registry = f"distributor.registry={issued / 'registry' / 'registry.sqlite'}"
    for args in (("task=issue", "user_id=zoe", f"distributor.copies_dir={tmp_path / 'copies'}",
                  f"distributor.registry={tmp_path / 'registry.sqlite'}"),
                 ("task=attribute", f"images={issued / 'bob_images'}", registry),
                 ("task=trace", f"images={issued / 'bob_images'}", registry)):
        result = cli(*args, f"paths.root_dir={tmp_path}", f"distributor.checkpoint={damaged}", env=env)
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip().splitlines() == [
            f"error: checkpoint {damaged}: fingerprint.safetensors truncated, altered or missing "
            "(does not match its SHA256SUMS)"]
    assert registry_state(issued) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no registry, copies or outputs/
