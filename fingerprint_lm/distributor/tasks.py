"""The distributor's command-line tasks (``python -m fingerprint_lm task=<name>``).

``run_task(cfg)`` reads the Hydra config and calls the plain functions of this package; it writes
``<run dir>/<task>.json`` (for machines) and prints a short table (for people). See
``docs/distributor.md`` for the commands and the JSON fields.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig, ListConfig, OmegaConf

from fingerprint_lm.errors import CheckpointError, ConfigError, RegistryError
from fingerprint_lm.models.checkpoint import load_fingerprint_model, shipped_checkpoint
from fingerprint_lm.registry.store import Registry
from fingerprint_lm.storage import atomic_write_text

log = logging.getLogger(__name__)

DISTRIBUTOR_TASKS: tuple[str, ...] = ("issue", "users", "attribute", "trace", "generate", "verify")


# -- config plumbing ------------------------------------------------------------------------------
def checkpoint_dir(checkpoint: str | None, shipped: str = "embedded") -> Path:
    """The trained model's folder: ``checkpoint`` or, when None, the shipped checkpoint
    ``assets/<shipped>`` of the selected method (``method.checkpoint_name``)."""
    return Path(checkpoint) if checkpoint else shipped_checkpoint(shipped)


def checkpoint_code_length(directory: Path) -> int:
    """The fingerprint length of a checkpoint, from its ``fingerprint.json`` alone (no weights read)."""
    meta_path = directory / "fingerprint.json"
    if not meta_path.is_file():
        raise CheckpointError(f"no fingerprint checkpoint at {directory} (fingerprint.json missing)")
    try:
        return int(json.loads(meta_path.read_text())["fingerprint_bits"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"corrupt {meta_path}: {exc}") from exc


def open_registry(path: str | Path, code_length: int, min_distance: int | None = None,
                  create: bool = False, method: str | None = None) -> Registry:
    """Open the registry file; only ``create=True`` (issuing) may make a new one. ``method``
    (the checkpoint's): a registry of another method's users is refused."""
    path = Path(path)
    if not path.is_file():
        if not create:
            raise RegistryError(f"no registry at {path} (issue a copy first: task=issue user_id=NAME)")
        path.parent.mkdir(parents=True, exist_ok=True)
    return Registry(path, code_length, min_distance=min_distance, method=method)


def code_rng(code_seed: int | None, user_id: str) -> np.random.Generator | None:
    """The generator a user's code is drawn from: None (OS entropy) unless ``code_seed`` is set,
    then seeded by ``(code_seed, user_id)`` so that a replayed experiment draws the same codes."""
    if code_seed is None:
        return None
    digest = hashlib.sha256(user_id.encode("utf-8")).digest()
    return np.random.default_rng([int(code_seed), int.from_bytes(digest[:8], "little")])


def _user_id(cfg: DictConfig, task: str) -> str:
    user_id = cfg.get("user_id")
    if user_id is None or isinstance(user_id, bool):
        raise ConfigError(f"task={task} needs user_id=NAME")
    return str(user_id)  # `user_id=42` arrives as an int


def _required(cfg: DictConfig, key: str, task: str, example: str) -> Any:
    value = cfg.get(key)
    if value is None or value == "":
        raise ConfigError(f"task={task} needs {key}={example}")
    return OmegaConf.to_container(value) if isinstance(value, DictConfig | ListConfig) else value


def _fpr(settings: DictConfig) -> float:
    fpr = float(settings.fpr)
    if not 0.0 < fpr < 1.0:
        raise ConfigError(f"distributor.fpr must lie in (0, 1), got {settings.fpr}")
    return fpr


# -- tasks ----------------------------------------------------------------------------------------
def task_issue(cfg: DictConfig) -> dict:
    from fingerprint_lm.distributor.copies import check_user_id, issue_copy, read_secret

    settings = cfg.distributor
    user_id = check_user_id(_user_id(cfg, "issue"))
    act_type = str(cfg.act.type)
    # The secret first: a missing secret must fail before anything is loaded or written.
    secret = read_secret(settings.secret_env, settings.secret_file) if act_type != "none" else None
    model = load_fingerprint_model(checkpoint_dir(settings.checkpoint, cfg.method.checkpoint_name))
    with open_registry(settings.registry, model.fingerprint_bits, int(settings.min_distance), create=True,
                       method=model.method) as reg:
        result = issue_copy(
            model,
            reg,
            user_id,
            settings.copies_dir,
            secret=secret,
            act_type=act_type,
            scale_range=(float(cfg.act.scale_min), float(cfg.act.scale_max)),
            act_scope=str(cfg.act.scope),
            rng=code_rng(settings.get("code_seed"), user_id),
        )
        result["n_users"] = len(reg)
    result["registry"] = str(settings.registry)
    return result


def task_users(cfg: DictConfig) -> dict:
    settings = cfg.distributor
    k = checkpoint_code_length(checkpoint_dir(settings.checkpoint, cfg.method.checkpoint_name))
    with open_registry(settings.registry, k) as reg:
        users = []
        for user_id in reg.list_users():
            row = reg.get(user_id)
            users.append({key: row[key] for key in ("user_id", "created", "act_type", "copy_sha256")})
        return {
            "registry": str(settings.registry),
            "code_length": reg.code_length,
            "min_distance": reg.min_distance,
            "n_users": len(users),
            "users": users,
        }


def _read_task_images(cfg: DictConfig, task: str, model) -> list:
    from fingerprint_lm.distributor.attribution import read_images

    images = _required(cfg, "images", task, "PATH (an image file or a folder)")
    return read_images(images, min_size=int(model.extractor.min_image_size))


def task_attribute(cfg: DictConfig) -> dict:
    from fingerprint_lm.distributor.attribution import attribute_images

    settings = cfg.distributor
    fpr = _fpr(settings)
    model = load_fingerprint_model(checkpoint_dir(settings.checkpoint, cfg.method.checkpoint_name))
    with open_registry(settings.registry, model.fingerprint_bits, method=model.method) as reg:
        images = _read_task_images(cfg, "attribute", model)
        return attribute_images(model.extractor, reg, images, fpr=fpr)


def task_trace(cfg: DictConfig) -> dict:
    from fingerprint_lm.distributor.attribution import trace_images

    settings = cfg.distributor
    fpr = _fpr(settings)
    model = load_fingerprint_model(checkpoint_dir(settings.checkpoint, cfg.method.checkpoint_name))
    with open_registry(settings.registry, model.fingerprint_bits, method=model.method) as reg:
        images = _read_task_images(cfg, "trace", model)
        return trace_images(model.extractor, reg, images, fpr=fpr, top=int(settings.top))


def task_generate(cfg: DictConfig) -> dict:
    from fingerprint_lm.distributor.copies import load_copy
    from fingerprint_lm.distributor.generation import decode_with, held_out_images, save_pngs

    settings = cfg.distributor
    copy = str(_required(cfg, "copy", "generate", "PATH (a copy folder, or `base`)"))
    n_images = cfg.get("n_images")
    model = load_fingerprint_model(checkpoint_dir(settings.checkpoint, cfg.method.checkpoint_name))
    resolution = int(model.meta.get("resolution") or cfg.data.resolution)
    images = held_out_images(resolution, n_images, seed=int(cfg.seed))
    decoder_vae = model.vae if copy == "base" else load_copy(copy)
    decoded = decode_with(model.vae, decoder_vae, images)
    out = Path(cfg.get("out") or Path(cfg.paths.output_dir) / "images")
    files = save_pngs(decoded, out)
    return {"copy": copy, "n_images": len(files), "resolution": resolution, "out": str(out), "files": files}


def task_verify(cfg: DictConfig) -> dict:
    from fingerprint_lm.distributor.copies import verify_copy

    settings = cfg.distributor
    user_id = _user_id(cfg, "verify")
    copy = str(_required(cfg, "copy", "verify", "PATH (a copy folder)"))
    k = checkpoint_code_length(checkpoint_dir(settings.checkpoint, cfg.method.checkpoint_name))
    with open_registry(settings.registry, k) as reg:
        return verify_copy(copy, reg, user_id)


_TASKS = {
    "issue": task_issue,
    "users": task_users,
    "attribute": task_attribute,
    "trace": task_trace,
    "generate": task_generate,
    "verify": task_verify,
}


def run_task(cfg: DictConfig) -> dict:
    """Run the distributor task ``cfg.task``; write ``<run dir>/<task>.json``; print a summary."""
    task = cfg.task
    if task not in _TASKS:
        raise ConfigError(f"unknown distributor task {task!r}; expected one of {', '.join(DISTRIBUTOR_TASKS)}")
    result = _TASKS[task](cfg)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    json_path = output_dir / f"{task}.json"
    atomic_write_text(json_path, json.dumps(result, indent=2))
    print_summary(task, result, json_path)
    return result


# -- console --------------------------------------------------------------------------------------
_MAX_ROWS = 20


def print_summary(task: str, result: dict, json_path: Path | None = None) -> None:
    """A short human summary of a task's result (the JSON file has everything)."""
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False)
    table: Table | None = None
    if task == "issue":
        console.print(f"issued [bold]{result['user_id']}[/] (ACT {result['act_type']}): {result['copy']}")
        console.print(f"sha256 {result['copy_sha256'][:16]}..., {result['n_users']} users registered")
    elif task == "users":
        table = Table("user", "created", "ACT", "copy sha256", title=f"{result['n_users']} users")
        for row in result["users"][:_MAX_ROWS]:
            table.add_row(row["user_id"], row["created"], str(row["act_type"]), (row["copy_sha256"] or "-")[:16])
    elif task == "attribute":
        accused = sum(r["accused"] for r in result["images"])
        threshold = result["match_threshold"]
        needed = f">= {threshold}/{result['code_length']} bits" if threshold is not None else "unreachable"
        title = f"{accused}/{len(result['images'])} attributed (fpr {result['fpr']:g}: {needed})"
        table = Table("image", "user", "matching bits", "p-value", title=title)
        for row in result["images"][:_MAX_ROWS]:
            user = row["user_id"] or f"- (nearest {row['nearest_user_id']})"
            table.add_row(Path(row["image"]).name, user, f"{row['matching_bits']}/{result['code_length']}",
                          f"{row['p_value']:.2e}")
    elif task == "trace":
        title = f"{result['n_images']} images: accused if score >= {result['threshold']:.2f}"
        table = Table("user", "score", "p-value bound", "accused", title=title)
        for row in result["suspects"][:_MAX_ROWS]:
            table.add_row(row["user_id"], f"{row['score']:.2f}", f"{row['p_value_bound']:.2e}",
                          "yes" if row["accused"] else "no")
    elif task == "generate":
        console.print(f"wrote {result['n_images']} images from {result['copy']} to {result['out']}")
    elif task == "verify":
        console.print(f"copy {result['copy']} matches the registered hash of {result['user_id']}")
    if table is not None:
        console.print(table)
    if json_path is not None:
        console.print(f"details: {json_path}")
