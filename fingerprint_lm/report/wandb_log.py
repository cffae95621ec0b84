"""Reading a W&B run's transaction log (the ``run-<id>.wandb`` file an offline run writes) without
the W&B service: recent wandb versions write only that log for offline runs, so comparing local
offline runs means replaying it (``task=report``, :mod:`fingerprint_lm.report.compare`)."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from fingerprint_lm.errors import DataError

# -- W&B transaction logs (the .wandb file an offline run writes) ---------------------------------
# The file is W&B's 7-byte header (":W&B", magic 0xBEE1, version 0) followed by LevelDB-log framed
# chunks: 32 KiB blocks, each chunk a 7-byte header (crc32c, length, type) and its payload; a
# record split across blocks is FIRST + MIDDLE* + LAST. Each record is a protobuf ``Record``.
_LOG_IDENT = b":W&B"
_LOG_MAGIC = 0xBEE1
_LOG_VERSION = 0
_LOG_BLOCK = 32 * 1024
_CHUNK_HEADER = 7
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _log_payloads(path: Path) -> list[bytes]:
    raw = path.read_bytes()
    if len(raw) < 7 or raw[:4] != _LOG_IDENT:
        raise DataError(f"{path} is not a W&B transaction log")
    magic, version = struct.unpack("<HB", raw[4:7])
    if magic != _LOG_MAGIC or version != _LOG_VERSION:
        raise DataError(f"{path}: unsupported W&B log format (magic {magic:#x}, version {version})")
    payloads, pending, pos = [], None, 7
    while True:
        room = _LOG_BLOCK - pos % _LOG_BLOCK
        if room < _CHUNK_HEADER:  # a block's tail too short for a header is padding
            pos += room
            continue
        if pos + _CHUNK_HEADER > len(raw):
            break
        _crc, length, kind = struct.unpack("<IHB", raw[pos : pos + _CHUNK_HEADER])
        end = pos + _CHUNK_HEADER + length
        if kind == 0 or end > len(raw):  # zero fill or a run killed mid-write: keep what came before
            break
        chunk = raw[pos + _CHUNK_HEADER : end]
        pos = end
        if kind == _FULL:
            payloads.append(chunk)
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE and pending is not None:
            pending += chunk
        elif kind == _LAST and pending is not None:
            payloads.append(pending + chunk)
            pending = None
    return payloads


def _apply_items(target: dict, items, remove: bool = False) -> None:
    """Replay W&B summary/config items (``key`` or ``nested_key`` path, ``value_json``)."""
    for item in items:
        keys = list(item.nested_key) or [item.key]
        node = target
        for key in keys[:-1]:
            node = node.setdefault(key, {})
            if not isinstance(node, dict):
                break
        else:
            if remove:
                node.pop(keys[-1], None)
            else:
                node[keys[-1]] = json.loads(item.value_json)


def read_wandb_transaction_log(path: str | Path) -> dict[str, Any]:
    """Replay a run's ``.wandb`` log: ``{"run_id", "name", "group", "config", "summary"}``."""
    try:
        from google.protobuf.message import DecodeError
        from wandb.proto import wandb_internal_pb2
    except ImportError as exc:  # the record schema ships with wandb
        raise DataError(f"reading {path} needs the wandb package: {exc}") from exc

    path = Path(path)
    state: dict[str, Any] = {"run_id": None, "name": None, "group": None, "config": {}, "summary": {}}
    for payload in _log_payloads(path):
        record = wandb_internal_pb2.Record()
        try:
            record.ParseFromString(payload)
        except DecodeError as exc:
            raise DataError(f"corrupt record in {path}: {exc}") from exc
        kind = record.WhichOneof("record_type")
        if kind == "run":
            state["run_id"] = record.run.run_id or state["run_id"]
            state["name"] = record.run.display_name or state["name"]
            state["group"] = record.run.run_group or state["group"]
            _apply_items(state["config"], record.run.config.update)
            _apply_items(state["summary"], record.run.summary.update)
        elif kind == "config":
            _apply_items(state["config"], record.config.update)
            _apply_items(state["config"], record.config.remove, remove=True)
        elif kind == "summary":
            _apply_items(state["summary"], record.summary.update)
            _apply_items(state["summary"], record.summary.remove, remove=True)
    return state
