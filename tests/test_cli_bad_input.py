"""Every command on bad input, through the console as a user types it: one ``error:`` line, exit
code 2, the registry untouched and nothing written (no registry, copies, images or Hydra run
folder under the command's root). The image corpus (corrupt, empty, 1x1, bomb, 16-bit, CMYK,
animated) is walked file by file in-process by tests/test_bad_input_corpus.py; here a folder of
its unreadable files goes through the console.

The console entry runs in this interpreter (tests/console.py: a fresh one costs ~7 s of imports a
case); one case also runs through a real ``python -m fingerprint_lm``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fingerprint_lm.models.checkpoint import SHIPPED_CHECKPOINT
from tests.conftest import ROOT, SECRET, TINY_BITS, registry_state
from tests.console import run_console
from tests.test_bad_input_corpus import write_corpus


def _inputs(issued: Path, checkpoint: Path, folder: Path) -> dict[str, Path]:
    """Bad inputs made once per test from the shared issued state (which stays untouched): a
    truncated copy and checkpoint, a corrupt image, and a folder of the image corpus's unreadable
    files only (tests/test_bad_input_corpus.py)."""
    folder.mkdir()
    corpus = write_corpus(folder / "corpus", issued / "bob_images" / "img_0000.png")
    only_bad = folder / "only_bad"
    only_bad.mkdir()
    for file in corpus:
        shutil.copy(folder / "corpus" / file, only_bad / file)
    truncated_checkpoint = folder / "truncated_checkpoint"
    shutil.copytree(checkpoint, truncated_checkpoint)
    weights = truncated_checkpoint / "fingerprint.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    truncated = folder / "truncated_copy"
    shutil.copytree(issued / "copies" / "bob", truncated)
    weights = truncated / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    return {"truncated_copy": truncated, "corrupt": folder / "corrupt.png", "only_bad": only_bad,
            "truncated_checkpoint": truncated_checkpoint}


# (id, the command's own arguments, words its one error line must contain); {name} = a path
CASES = [
    ("bad_user_id", ["task=issue", "user_id=../evil"], "user id"),
    ("unknown_user", ["task=verify", "copy={bob}", "user_id=zed"], "unknown user 'zed'"),
    ("someone_elses_copy", ["task=verify", "copy={bob}", "user_id=alice"], "does not match the registered hash"),
    ("truncated_copy", ["task=generate", "copy={truncated_copy}", "out={root}/images"], "truncated_copy"),
    ("corrupt_image", ["task=attribute", "images={corrupt}"], "corrupt.png"),
    ("no_images_argument", ["task=trace"], "task=trace needs images="),
    ("only_unreadable_images", ["task=trace", "images={only_bad}"], "no readable image: 5 skipped"),
    ("truncated_checkpoint", ["task=attribute", "images={bob_images}", "distributor.checkpoint={truncated_checkpoint}"],
     "truncated_checkpoint"),
    ("value_of_wrong_type", ["task=attribute", "images={bob_images}", "distributor.fpr=abc"], "distributor.fpr"),
    ("value_out_of_range", ["task=trace", "images={bob_images}", "distributor.fpr=2"], "must lie in (0, 1)"),
    ("unknown_key", ["task=attribute", "images={bob_images}", "distributor.nope=1"], "nope"),
    ("unknown_group_option", ["task=attribute", "images={bob_images}", "act=bogus"], "bogus"),
    ("misspelt_method_setting", ["method=pnm", "+method.train.lrr=1"], "method.train has no setting 'lrr'"),
    ("method_setting_out_of_range", ["method=pnm", "method.augment.p_jpeg=1.5"], "method.augment.p_jpeg must be"),
    ("wrong_code_length", ["task=attribute", "images={bob_images}", f"distributor.checkpoint={SHIPPED_CHECKPOINT}"],
     "48"),
]


# This case also runs through a fresh interpreter, as the user's shell starts it.
REAL_INTERPRETER = "only_unreadable_images"


@pytest.mark.parametrize(("case", "args", "words"), CASES, ids=[case[0] for case in CASES])
def test_each_command_refuses_bad_input_in_one_line(issued, checkpoint, tmp_path, case, args, words):
    paths = {**_inputs(issued, checkpoint, tmp_path / "inputs"), "bob": issued / "copies" / "bob",
             "bob_images": issued / "bob_images", "root": tmp_path / "root"}
    root = paths["root"]
    root.mkdir()
    before = registry_state(issued)
    common = ["logger=none", f"paths.root_dir={root}", f"fingerprint_bits={TINY_BITS}",
              f"distributor.checkpoint={checkpoint}", f"distributor.registry={issued / 'registry' / 'registry.sqlite'}",
              f"distributor.copies_dir={root / 'copies'}"]
    env = {**os.environ, "FINGERPRINT_LM_SECRET": SECRET, "OMP_NUM_THREADS": "1"}
    argv = [*common, *(a.format(**paths) for a in args)]
    if case == REAL_INTERPRETER:
        result = subprocess.run([sys.executable, "-m", "fingerprint_lm", *argv], cwd=ROOT, capture_output=True,
                                text=True, timeout=120, env=env)
    else:
        result = run_console(argv, cwd=ROOT, env=env)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], result.stderr
    assert registry_state(issued) == before
    assert not list(root.iterdir())  # nothing written: no registry, copies, images or outputs/
