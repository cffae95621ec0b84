"""Storage foundations: atomic writes and directories, config hashing for content-addressed caches
(base VAE, trained fingerprint models). Imports nothing of the project (docs/design.md, layout)."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def config_hash(config: Any, length: int = 12) -> str:
    """Stable short hash of a JSON-serialisable config (key order does not matter)."""
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def _temp_prefix(target: Path) -> str:
    """``.<name>.<host>-<pid>.``: temporaries say who writes them, so a later writer can tell one
    left by a process that died (kill -9, OOM) from one a live process is still writing."""
    return f".{target.name}.{socket.gethostname()}-{os.getpid()}."


def remove_dead_writers_temporaries(target: Path) -> None:
    """Remove the temporaries beside ``target`` whose writer, a process of this host, is gone
    (another host's are left alone: its process ids mean nothing here)."""
    host = socket.gethostname()
    for stale in target.parent.glob(f".{glob.escape(target.name)}.{glob.escape(host)}-*.*"):
        pid = stale.name[len(f".{target.name}.{host}-"):].split(".", 1)[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def _umask() -> int:
    """The process's umask (read by setting it: there is no getter; set straight back)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


@contextlib.contextmanager
def atomic_directory(target: str | Path, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary directory beside ``target``; it replaces ``target`` only if the block
    succeeds, so a crash or bad input never leaves a half-written artefact behind (and what a
    killed writer left is removed by the next one).

    ``overwrite=False``: an artefact, once written, is never replaced (a user's issued copy):
    :class:`FileExistsError` when ``target`` exists before the block or appears during it."""
    target = Path(target)
    if not overwrite and target.exists():
        raise FileExistsError(f"{target} already exists")
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_writers_temporaries(target)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(target), dir=target.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the artefact should not be
    try:
        yield tmp
        if not overwrite:
            try:  # a rename onto a folder that appeared meanwhile fails (it is not empty) rather than merge
                os.rename(tmp, target)
            except OSError as exc:
                raise FileExistsError(f"cannot create {target}: {exc.strerror or exc}") from exc
            return
        if target.exists():
            shutil.rmtree(target)
        try:
            os.replace(tmp, target)
        except OSError:
            # Parallel sweep jobs (SLURM arrays) missing the same cache entry all build it; a
            # rename onto the directory another job wrote first fails: keep that copy.
            if not target.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_files(directory: str | Path) -> Iterator[Path]:
    """Yield a staging folder inside ``directory``; when the block succeeds, each file written
    there replaces its namesake in ``directory``, one ``os.replace`` each, and only then (each
    file is atomic; a kill between two renames leaves some old and some new files, all whole). For
    folders that hold more than the files written (a sweep's point folders beside its summary, an
    earlier report's plots), which :func:`atomic_directory` would swap away whole. A failed block
    changes nothing in ``directory``; a killed writer's staging folder is removed by the next one."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    marker = directory / "staged-files"  # names the staging folders: .staged-files.<host>-<pid>.*
    remove_dead_writers_temporaries(marker)
    staging = Path(tempfile.mkdtemp(prefix=_temp_prefix(marker), dir=directory))
    try:
        yield staging
        for path in sorted(staging.iterdir()):
            os.replace(path, directory / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a file via a temporary sibling and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_writers_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's file is private; the result is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def append_jsonl(path: str | Path, *rows: Any) -> None:
    """Append ``rows`` to a JSON-lines log (an experiment's results), one line each, in one write:
    a run killed meanwhile leaves whole rows, never part of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        handle.write("".join(json.dumps(row) + "\n" for row in rows))


# -- checksums ------------------------------------------------------------------------------------
CHECKSUMS_NAME = "SHA256SUMS"  # the format of `sha256sum`: `sha256sum -c SHA256SUMS` checks it too


def update_with_file(digest, path: str | Path) -> None:
    """Feed a file's bytes to a ``hashlib`` digest in 1 MiB blocks (checkpoints can be GBs)."""
    with Path(path).open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    update_with_file(digest, path)
    return digest.hexdigest()


def write_checksums(directory: str | Path) -> None:
    """List every file under ``directory`` (but the list itself) with its SHA-256, sorted."""
    directory = Path(directory)
    files = sorted(p for p in directory.rglob("*") if p.is_file() and p.name != CHECKSUMS_NAME)
    lines = [f"{file_sha256(p)}  {p.relative_to(directory).as_posix()}\n" for p in files]
    (directory / CHECKSUMS_NAME).write_text("".join(lines))


def mismatched_files(directory: str | Path) -> list[str] | None:
    """The files of ``directory``'s checksum list that are missing or differ from it; None when the
    directory has no list (written before lists were)."""
    directory = Path(directory)
    listing = directory / CHECKSUMS_NAME
    if not listing.is_file():
        return None
    bad = []
    for line in listing.read_text().splitlines():
        expected, _, name = line.partition("  ")
        file = directory / name
        if not name or not file.is_file() or file_sha256(file) != expected:
            bad.append(name or line)
    return bad
