"""The distributor's commands: ``python -m fingerprint_lm task=issue|users|attribute|trace|generate|verify``.

Each reads the Hydra config and calls the plain functions of :mod:`fingerprint_lm.distributor`;
the wrapper writes ``<run dir>/<task>.json`` (for machines) and :func:`print_summary` prints a
short table (for people). ``docs/distributor.md`` has the commands and the JSON fields.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from rich.console import Console
from rich.table import Table

from fingerprint_lm.config_schema import read_settings
from fingerprint_lm.distributor.attribution import attribute_images, read_suspect_images, trace_images
from fingerprint_lm.distributor.copies import (
    check_user_id,
    code_rng,
    issue_copy,
    load_copy,
    read_secret,
    verify_copy,
)
from fingerprint_lm.distributor.generation import decode_with, held_out_images, save_pngs
from fingerprint_lm.distributor.issue_screens import choose_screen, make_screen, screen_report
from fingerprint_lm.distributor.screening import bound_pass_rate
from fingerprint_lm.errors import ConfigError
from fingerprint_lm.models.checkpoint import (
    checkpoint_code_length,
    load_fingerprint_model,
    shipped_checkpoint,
)
from fingerprint_lm.registry.store import open_registry
from fingerprint_lm.tasks.wrapper import Task, TaskContext


# -- config plumbing ------------------------------------------------------------------------------
def checkpoint_dir(cfg: DictConfig) -> Path:
    """The trained model's folder: ``distributor.checkpoint`` or, when null, the shipped
    checkpoint of the selected method (``assets/<method.checkpoint_name>``)."""
    checkpoint = cfg.distributor.checkpoint
    return Path(checkpoint) if checkpoint else shipped_checkpoint(str(cfg.method.checkpoint_name))


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


# -- tasks ----------------------------------------------------------------------------------------
def task_issue(cfg: DictConfig, context: TaskContext) -> dict:
    settings, act = read_settings(cfg, "distributor"), read_settings(cfg, "act")
    user_id = check_user_id(_user_id(cfg, "issue"))
    act_type = act.type
    # The secret first: a missing secret must fail before anything is loaded or written.
    secret = read_secret(settings.secret_env, settings.secret_file) if act_type != "none" else None
    model = load_fingerprint_model(checkpoint_dir(cfg))
    overridden = settings.min_probe_bit_acc is not None or settings.min_probe_psnr is not None
    # which screen, refused (no predictor, or one beside probe floors) before the registry is opened
    kind = choose_screen(model, settings.screen_by, settings.screen_codes, overridden)
    with open_registry(settings.registry, model.fingerprint_bits, settings.min_distance, create=True,
                       method=model.method) as reg:
        screen = make_screen(kind, model, reg, settings.min_probe_bit_acc, settings.min_probe_psnr)
        result = issue_copy(
            model,
            reg,
            user_id,
            settings.copies_dir,
            secret=secret,
            act_type=act_type,
            scale_range=(act.scale_min, act.scale_max),
            act_scope=act.scope,
            rng=code_rng(settings.code_seed, user_id),
            draw_code=screen,
        )
        if screen is not None:
            result.update(screen_report(screen))
        result["n_users"] = len(reg)
    result["registry"] = str(settings.registry)
    return result


def task_users(cfg: DictConfig, context: TaskContext) -> dict:
    settings = read_settings(cfg, "distributor")
    k = checkpoint_code_length(checkpoint_dir(cfg))
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


def _read_suspects(cfg: DictConfig, task: str, score) -> dict:
    """``score(extractor, index, images, settings, rate)`` on the ``images=`` of ``task`` against the
    registry (attribute and trace read the same inputs and differ only in how they score them;
    ``rate``: the screened codes' pass rate the bound divides by, ``screening.bound_pass_rate``)."""
    settings = read_settings(cfg, "distributor")
    model = load_fingerprint_model(checkpoint_dir(cfg))
    with open_registry(settings.registry, model.fingerprint_bits, method=model.method) as reg:
        paths = _required(cfg, "images", task, "PATH (an image file or a folder)")
        images, skipped = read_suspect_images(paths, min_size=int(model.reader.min_image_size))
        rate = bound_pass_rate(reg.screen_pass_rate(), model.meta.get("issue_screen"))
        return {**score(model.reader, reg.index(), images, settings, rate), "skipped": skipped}


def task_attribute(cfg: DictConfig, context: TaskContext) -> dict:
    return _read_suspects(cfg, "attribute", lambda extractor, index, images, settings, rate: attribute_images(
        extractor, index, images, fpr=settings.fpr, decoding=settings.decoding, read_mirrored=settings.read_mirrored,
        screen_pass_rate=rate))


def task_trace(cfg: DictConfig, context: TaskContext) -> dict:
    return _read_suspects(cfg, "trace", lambda extractor, index, images, settings, rate: trace_images(
        extractor, index, images, fpr=settings.fpr, top=settings.top, scoring=settings.tracing,
        decoding=settings.decoding, screen_pass_rate=rate))


def task_generate(cfg: DictConfig, context: TaskContext) -> dict:
    copy = str(_required(cfg, "copy", "generate", "PATH (a copy folder, or `base`)"))
    n_images = cfg.get("n_images")
    model = load_fingerprint_model(checkpoint_dir(cfg))
    resolution = int(model.meta.get("resolution") or cfg.data.resolution)
    images = held_out_images(resolution, n_images, seed=int(cfg.seed))
    decoder_vae = model.unmarked_vae if copy == "base" else load_copy(copy)
    decoded = decode_with(model.vae, decoder_vae, images)
    out = Path(cfg.get("out") or context.output_dir / "images")
    files = save_pngs(decoded, out)
    return {"copy": copy, "n_images": len(files), "resolution": resolution, "out": str(out), "files": files}


def task_verify(cfg: DictConfig, context: TaskContext) -> dict:
    settings = read_settings(cfg, "distributor")
    user_id = _user_id(cfg, "verify")
    copy = str(_required(cfg, "copy", "verify", "PATH (a copy folder)"))
    k = checkpoint_code_length(checkpoint_dir(cfg))
    with open_registry(settings.registry, k) as reg:
        return verify_copy(copy, reg, user_id)


# -- console --------------------------------------------------------------------------------------
_MAX_ROWS = 20


def _screened(result: dict) -> str:
    rate = result.get("screen_pass_rate", 1.0)
    return f"; screened codes, pass rate {rate:.3f}: tested at fpr {result['uniform_code_fpr']:.3g}" if rate < 1 else ""


def print_summary(task: str, result: dict, json_path: Path | None = None) -> None:
    """A short human summary of a task's result (the JSON file has everything)."""
    console = Console(highlight=False)
    table: Table | None = None
    if task == "issue":
        console.print(f"issued [bold]{result['user_id']}[/] (ACT {result['act_type']}): {result['copy']}")
        console.print(f"sha256 {result['copy_sha256'][:16]}..., {result['n_users']} users registered")
        if "predicted_bit_acc" in result:
            console.print(f"code screened in {result['code_draws']} draw(s): predicted probe bit_acc "
                          f"{result['predicted_bit_acc']:.3f}, {result['predicted_psnr']:.2f} dB")
        elif "code_draws" in result:
            console.print(f"code screened in {result['code_draws']} draw(s): probe bit_acc "
                          f"{result['probe_bit_acc']:.3f}, {result['probe_psnr']:.2f} dB")
    elif task == "users":
        table = Table("user", "created", "ACT", "copy sha256", title=f"{result['n_users']} users")
        for row in result["users"][:_MAX_ROWS]:
            table.add_row(row["user_id"], row["created"], str(row["act_type"]), (row["copy_sha256"] or "-")[:16])
    elif task == "attribute":
        accused = sum(r["accused"] for r in result["images"])
        threshold = result["match_threshold"]
        needed = f">= {threshold}/{result['code_length']} bits" if threshold is not None else "unreachable"
        if result.get("decoding", "hard") != "hard":
            needed = f"{result['decoding'].replace('_', ' ')} decoding, p-value <= fpr"
        if result.get("read_mirrored"):
            needed += "; each image read as found and mirrored, at fpr/2 each"
        title = f"{accused}/{len(result['images'])} attributed (fpr {result['fpr']:g}: {needed}){_screened(result)}"
        table = Table("image", "user", "matching bits", "p-value", title=title)
        for row in result["images"][:_MAX_ROWS]:
            user = row["user_id"] or f"- (nearest {row['nearest_user_id']})"
            if row.get("orientation") == "mirrored":
                user += " (mirrored)"
            table.add_row(Path(row["image"]).name, user, f"{row['matching_bits']}/{result['code_length']}",
                          f"{row['p_value']:.2e}")
    elif task == "trace":
        rule = ("an image names them or pooled score" if result["scoring"] == "evidence" else "Tardos score")
        title = (f"{result['n_images']} images, fpr {result['fpr']:g}: accused if {rule} >= "
                 f"{result['threshold']:.2f}{_screened(result)}")
        table = Table("user", "images", "pooled score", "p-value bound", "evidence", "accused", title=title)
        for row in result["suspects"][:_MAX_ROWS]:
            table.add_row(row["user_id"], str(row.get("n_images", "-")), f"{row['score']:.2f}",
                          f"{row['p_value_bound']:.2e}", row.get("evidence") or "-", "yes" if row["accused"] else "no")
    elif task == "generate":
        console.print(f"wrote {result['n_images']} images from {result['copy']} to {result['out']}")
    elif task == "verify":
        console.print(f"copy {result['copy']} matches the registered hash of {result['user_id']}")
    if table is not None:
        console.print(table)
    if json_path is not None:
        console.print(f"details: {json_path}")


def _json_path(name: str, cfg: DictConfig) -> Path:
    return Path(cfg.paths.output_dir) / f"{name}.json"


def _task(name: str, body) -> Task:
    return Task(name, body, json_path=partial(_json_path, name), summarize=partial(print_summary, name))


ISSUE = _task("issue", task_issue)
USERS = _task("users", task_users)
ATTRIBUTE = _task("attribute", task_attribute)
TRACE = _task("trace", task_trace)
GENERATE = _task("generate", task_generate)
VERIFY = _task("verify", task_verify)
