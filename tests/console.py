"""The console entry, ``python -m fingerprint_lm <args>``, called in this interpreter.

A fresh interpreter spends 6-8 s importing torch, Lightning and diffusers before it reaches a single
line of ours; the bad-input tests call the console a dozen times, so each pays that for nothing
they check. :func:`run_console` runs ``fingerprint_lm/__main__.py`` as ``__main__`` (``runpy``, as ``-m`` does) with
``sys.argv``, the working directory and the environment as the user's shell would give them, and
returns what a ``subprocess.run`` would: the exit code, stdout and stderr. What only a fresh
interpreter shows (start-up itself, a real ``cwd``) stays covered by the tests that keep a real
subprocess: every README command (tests/test_readme_commands.py), one bad input
(tests/test_cli_bad_input.py), the kill -9 fault tests, DDP and SLURM.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import runpy
import subprocess
import sys
from pathlib import Path

from hydra.core.global_hydra import GlobalHydra


def run_console(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``python -m fingerprint_lm *args`` run in-process from ``cwd`` with ``env`` replacing the
    environment; the interpreter's state (argv, cwd, environment, root logging handlers, Hydra's
    global state) is put back afterwards."""
    saved_argv, saved_cwd, saved_env = sys.argv, os.getcwd(), dict(os.environ)
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    out, err = io.StringIO(), io.StringIO()
    code = 0
    try:
        sys.argv = ["fingerprint_lm", *args]
        os.chdir(cwd)
        if env is not None:
            os.environ.clear()
            os.environ.update(env)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                runpy.run_module("fingerprint_lm", run_name="__main__", alter_sys=True)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = saved_argv
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        for handler in root.handlers:  # Hydra's job logging: its console and run-folder file handlers
            if handler not in saved_handlers:
                handler.close()
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
        GlobalHydra.instance().clear()
    return subprocess.CompletedProcess(["python", "-m", "fingerprint_lm", *args], code, out.getvalue(), err.getvalue())
