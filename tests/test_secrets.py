"""The ACT secret never reaches disk: not in copies, the registry, run outputs, Hydra's saved
configs or W&B's offline files, in any common encoding."""

from __future__ import annotations

import base64
import os
import secrets

from fingerprint_lm.tasks import run
from tests.conftest import ROOT, compose_config
from tests.console import run_console


def _forms(secret: str) -> dict[str, bytes]:
    raw = secret.encode()
    return {
        "raw": raw,
        "hex": raw.hex().encode(),
        "HEX": raw.hex().upper().encode(),
        "base64": base64.b64encode(raw).rstrip(b"="),
        "urlsafe base64": base64.urlsafe_b64encode(raw).rstrip(b"="),
        "utf-16": secret.encode("utf-16-le"),
    }


def test_the_secret_is_in_no_file_the_workflow_writes(tmp_path, monkeypatch, capfd):
    secret = "act-secret-" + secrets.token_hex(16)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FINGERPRINT_LM_", "HYDRA_", "WANDB_"))}
    env.update(FINGERPRINT_LM_SECRET=secret, WANDB_MODE="offline", WANDB_SILENT="true", PYTHONPATH=str(ROOT))
    # Through the console (in this interpreter, tests/console.py): one distributor command (Hydra
    # saves its config) and the runs that log to W&B.
    commands = [
        ["task=issue", "user_id=alice"],
        ["+experiment=train", "debug=tiny", "logger=wandb"],  # a training run with W&B offline
        ["+experiment=collusion_sweep", "debug=tiny", "logger=wandb"],  # sweep points with W&B offline
    ]
    for args in commands:
        out = run_console(args, cwd=tmp_path, env=env)
        assert out.returncode == 0, (args, out.stderr[-2000:])
        for form, needle in _forms(secret).items():
            assert needle not in (out.stdout + out.stderr).encode(), (args, form)
    # The other distributor commands through run(), as the console calls it, same files.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FINGERPRINT_LM_SECRET", secret)
    for args in (["task=issue", "user_id=bob"],
                 ["task=generate", "copy=copies/alice", "n_images=8", "out=alice_images"],
                 ["task=attribute", "images=alice_images"],
                 ["task=trace", "images=alice_images"],
                 ["task=verify", "copy=copies/bob", "user_id=bob"]):
        run(compose_config(tmp_path, [*args, "logger=none"], tiny=False))
    printed = capfd.readouterr()
    for form, needle in _forms(secret).items():
        assert needle not in (printed.out + printed.err).encode(), form

    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    kinds = {p.relative_to(tmp_path).parts[0] for p in files}
    assert {"copies", "registry", "outputs", "alice_images"} <= kinds, kinds
    assert any("wandb" in p.parts for p in files), "W&B wrote no offline files"
    for path in files:
        data = path.read_bytes()
        for form, needle in _forms(secret).items():
            assert needle not in data, f"the secret ({form}) is in {path.relative_to(tmp_path)}"
