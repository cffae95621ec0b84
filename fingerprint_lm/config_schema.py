"""Structured configs: the types, ranges and choices of the settings groups the tasks read
(``act``, ``distributor``, ``sweep``, ``text2image``, ``report``, ``data``) and of the top-level keys
(``seed``, ``fingerprint_bits``, ...: :class:`RunConfig`), written once.

Two checks come from one dataclass per group:

- **types at composition.** Each group's YAML files extend its dataclass (``defaults:
  [/schema/<group>@_here_, _self_]``), so Hydra refuses ``distributor.fpr=abc`` or an unknown key
  before the task (and torch) is even imported.
- **ranges and choices at the task's start.** :func:`read_settings` resolves the group, builds its
  dataclass and so runs ``__post_init__``: ``distributor.fpr=2`` fails there with one
  ``error:`` line, whichever task reads it.

The dataclasses are registered in Hydra's ConfigStore (group ``schema``) when the package is
imported (``fingerprint_lm/__init__.py``), like the OmegaConf resolvers. This module imports only
omegaconf, hydra's ConfigStore and :mod:`fingerprint_lm.errors`: the CLI composes a config
without importing torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fingerprint_lm.errors import ConfigError, check_choice, check_float, check_int, check_probability

# The ACT types and where they act; models/act.py implements them (and re-exports these names).
ACT_TYPES: tuple[str, ...] = ("none", "permute", "scale", "sign", "all")
# The ResnetBlocks' interior channels, the residual stream (every segment of it,
# fingerprint_lm/models/residual_stream.py), or both.
ACT_SCOPES: tuple[str, ...] = ("interior", "stream", "both")
# How per-image attribution reads an image; registry/soft.py implements them (and re-exports the
# names). ``soft_whitened``: the soft test on the extractor's logits whitened on unmarked images
# (pnm's: without its per-bit calibration);
# ``soft_code_null``: the soft test, and each accused code's score against its own law over unmarked images.
DECODINGS: tuple[str, ...] = ("soft", "soft_whitened", "soft_code_null", "hard")
# task=issue and the sweep: decode the probe for each draw, or predict its read
# (distributor/read_predictor.py); auto: the predictor where the checkpoint records one
# (distributor/issue_screens.py: choose_screen)
SCREENS: tuple[str, ...] = ("auto", "probe", "predicted")


@dataclass
class RunConfig:
    """The top-level keys of ``conf/config.yaml`` every task may read, checked once at a task's start
    (``tasks/wrapper.py: run_task``); the code below it takes them as checked."""

    # Any, not int: an int field would turn '48' into 48 here while cfg, which the tasks read (the
    # sweep compares and hashes it), keeps the string; __post_init__ checks the value as they see it
    seed: Any = 0
    fingerprint_bits: Any = 48
    resume: bool = True
    init_from: str | None = None
    export_checkpoint: bool = False

    def __post_init__(self) -> None:
        check_int("seed", self.seed, 0)
        check_int("fingerprint_bits", self.fingerprint_bits)


@dataclass
class ActConfig:
    """``conf/act/*.yaml``: the Anti-Collusion Transformation of issued copies (one file per type)."""

    type: str = "all"
    scale_min: float = 0.25  # log-uniform range of the per-group scales (types scale, all)
    scale_max: float = 4.0
    scope: str = "stream"

    def __post_init__(self) -> None:
        check_choice("act.type", self.type, ACT_TYPES)
        check_choice("act.scope", self.scope, ACT_SCOPES)
        check_float("act.scale_min", self.scale_min, above=0.0)
        check_float("act.scale_max", self.scale_max, above=0.0)
        if self.scale_max < self.scale_min:
            raise ConfigError(f"act.scale_max must be >= act.scale_min, got [{self.scale_min}, {self.scale_max}]")


@dataclass
class DistributorConfig:
    """``conf/distributor/default.yaml``: the distributor's registry, copies and accusation rate."""

    registry: str = MISSING
    copies_dir: str = MISSING
    checkpoint: str | None = None
    secret_env: str | None = "FINGERPRINT_LM_SECRET"
    secret_file: str | None = None
    fpr: float = 1e-6
    min_distance: int = 8
    top: int = 10
    tracing: str = "evidence"
    decoding: str = "soft"
    read_mirrored: bool = False
    code_seed: int | None = None
    screen_codes: bool = True
    screen_by: str = "auto"
    min_probe_bit_acc: float | None = None
    min_probe_psnr: float | None = None

    def __post_init__(self) -> None:
        check_probability("distributor.fpr", self.fpr)
        check_choice("distributor.screen_by", self.screen_by, SCREENS)
        if self.min_probe_bit_acc is not None:
            check_float("distributor.min_probe_bit_acc", self.min_probe_bit_acc, above=0.0, maximum=1.0)
        if self.min_probe_psnr is not None:
            check_float("distributor.min_probe_psnr", self.min_probe_psnr, above=0.0)
        check_int("distributor.min_distance", self.min_distance, 0)
        check_int("distributor.top", self.top)
        check_choice("distributor.tracing", self.tracing, ("evidence", "tardos"))
        check_choice("distributor.decoding", self.decoding, DECODINGS)


@dataclass
class SweepGrid:
    """The collusion sweep's axes, each a comma-separated string (Hydra's basic sweeper)."""

    method: str = "carrier"
    fingerprint_bits: str = "48"
    act: str = "all"
    case: str = "none_c1"
    # grid points left out, each "key=value|value ..." over the swept keys (every term must match);
    # applied by hydra_plugins/fingerprint_lm_sweeper before the sweep starts
    skip: list[str] = field(default_factory=list)


@dataclass
class SweepConfig:
    """``conf/sweep/default.yaml``: how one point of the collusion sweep is evaluated."""

    checkpoint: str | None = None
    train_seed: int = 0
    case: str = "none_c1"  # parsed by the task, after the attack plug-ins are registered
    n_images: int = 256
    images: str = "procedural"
    device: str | None = "auto"  # None: auto (devices.resolve_device)
    n_innocents: int = 1000
    fpr: float = 1e-6
    tracing_fpr: float = 1e-3
    decoding: str = "soft"
    finetune_lr: float = 1e-4
    screen_codes: bool = True
    screen_by: str = "auto"
    fid_proxy_steps: int = 1000
    grid: SweepGrid = field(default_factory=SweepGrid)

    def __post_init__(self) -> None:
        # n_images, n_innocents, fpr, tracing_fpr, decoding, finetune_lr and screen_by: checked by the
        # evaluation library's PointSettings alone, which the task builds from them at once (the
        # library guards callers without a config; tasks/sweep_point.py: point_settings names them sweep.*)
        check_choice("sweep.images", self.images, ("procedural", "data"))
        check_int("sweep.fid_proxy_steps", self.fid_proxy_steps, 0)


@dataclass
class Text2ImageConfig:
    """``conf/text2image/default.yaml``: Stable Diffusion from a local folder, a user's copy as VAE."""

    pipeline_path: str | None = None
    user_id: Any = None  # `user_id=42` arrives as an int; the task checks it (distributor.check_user_id)
    copy_path: str | None = None
    verify_copy: bool = True
    baseline: bool = True
    coco_root: str = MISSING
    split: str = "val2017"
    annotation_file: str | None = None
    n_images: int = 16
    resolution: int | None = None
    num_inference_steps: int = 25
    guidance_scale: float = 7.5
    seed: int = 0
    batch_size: int = 4
    device: str | None = "auto"  # None: auto, as for the dtype
    dtype: str | None = "auto"  # checked against the device by evaluation.text2image.resolve_dtype
    fid: Any = "auto"  # YAML 1.1 reads `fid: off` as false: normalised below
    fid_min_images: int = 50
    fid_proxy_steps: int = 1000
    fid_proxy_resolution: int = 32
    grid_images: int = 8
    progress: bool = True
    output_dir: str = MISSING

    def __post_init__(self) -> None:
        check_int("text2image.n_images", self.n_images)
        if self.resolution is not None:
            check_int("text2image.resolution", self.resolution)
        check_int("text2image.num_inference_steps", self.num_inference_steps)
        check_float("text2image.guidance_scale", self.guidance_scale, minimum=0.0)
        check_int("text2image.batch_size", self.batch_size)
        self.fid = "off" if self.fid is False else str(self.fid)
        check_choice("text2image.fid", self.fid, ("auto", "clean", "proxy", "off"))
        if self.fid != "off":  # the Frechet settings matter only when a distance is computed
            check_int("text2image.fid_min_images", self.fid_min_images, 2)
            check_int("text2image.fid_proxy_steps", self.fid_proxy_steps)
            check_int("text2image.fid_proxy_resolution", self.fid_proxy_resolution, 16)
        check_int("text2image.grid_images", self.grid_images, 0)


@dataclass
class ReportConfig:
    """``conf/report/default.yaml``: which runs ``task=report`` compares and how."""

    runs: Any = field(default_factory=list)  # a list of folders, or one folder as a string
    wandb_path: str | None = None
    group: str | None = None
    filters: Any = None
    max_runs: int = 200
    metrics: Any = None
    config_keys: Any = None
    ignore_config: Any = field(default_factory=list)
    quality_metric: str | None = "psnr"  # None: psnr
    output_dir: str = MISSING

    def __post_init__(self) -> None:
        check_int("report.max_runs", self.max_runs)
        if not self.output_dir:
            raise ConfigError("report.output_dir must be a folder path, got ''")
        if self.filters is not None and not isinstance(self.filters, dict):
            raise ConfigError(f"report.filters must be a mapping, got {self.filters!r}")


# Where the image data module reads from (data/datamodule.py implements them).
DATA_SOURCES: tuple[str, ...] = ("synthetic", "coco", "coco_stream", "shards")


def check_data_arguments(source: str, resolution: int, batch_size: int, num_workers: int, seed: int,
                         val_size: int, test_size: int, shuffle_buffer: int = 256, coco_root: str | None = None,
                         shards: Any = None) -> None:
    """The image data module's arguments, checked once: by :class:`DataConfig` (a composed
    ``data`` group) and by ``ImageDataModule`` itself (callers without a config)."""
    if source not in DATA_SOURCES:
        raise ConfigError(f"unknown data source {source!r}; expected one of {', '.join(DATA_SOURCES)}")
    check_int("image resolution", resolution)
    check_int("batch size", batch_size)
    check_int("number of data workers", num_workers, minimum=0)
    check_int("data seed", seed, minimum=0)
    check_int("validation set size", val_size)
    check_int("test set size", test_size)
    check_int("shuffle buffer", shuffle_buffer, minimum=0)
    if source in ("coco", "coco_stream") and not coco_root:
        raise ConfigError(f"data source '{source}' needs coco_root (the folder holding annotations/ and images)")
    if source == "shards" and not shards:
        raise ConfigError("data source 'shards' needs shards (a .tar path, glob pattern or list of them)")


@dataclass
class DataConfig:
    """``conf/data/synthetic.yaml``: the image data module's arguments. Each source's file extends
    the class with exactly its own keys (below), so a composed ``data`` group holds the same keys
    as before the schema and the sweep's cache keys, which hash it, stay valid."""

    _target_: str = "fingerprint_lm.data.datamodule.ImageDataModule"
    source: str = "synthetic"
    resolution: int = 32
    batch_size: int = 32
    num_workers: int = 0
    seed: int = 0
    val_size: int = 256
    test_size: int = 256

    def __post_init__(self) -> None:
        check_data_arguments(self.source, self.resolution, self.batch_size, self.num_workers, self.seed,
                             self.val_size, self.test_size, getattr(self, "shuffle_buffer", 256),
                             getattr(self, "coco_root", None), getattr(self, "shards", None))


@dataclass
class CocoDataConfig(DataConfig):
    """``conf/data/coco.yaml``: a local COCO-captions folder, read map-style."""

    source: str = "coco"
    coco_root: str | None = MISSING  # null reaches check_data_arguments, which says what is missing
    coco_split: str = "val2017"


@dataclass
class CocoStreamDataConfig(CocoDataConfig):
    """``conf/data/coco_stream.yaml``: the same folder, streamed across ranks and workers."""

    source: str = "coco_stream"
    shuffle_buffer: int = 256


@dataclass
class ShardsDataConfig(DataConfig):
    """``conf/data/shards.yaml``: captioned images from tar shards (a path, a glob or a list)."""

    source: str = "shards"
    shards: Any = MISSING
    shuffle_buffer: int = 256


SCHEMAS: dict[str, type] = {
    "act": ActConfig,
    "distributor": DistributorConfig,
    "sweep": SweepConfig,
    "text2image": Text2ImageConfig,
    "report": ReportConfig,
}
# One schema per data source (``schema/data_<source>``): the data module checks its own arguments
# with check_data_arguments when it is built, so no task reads the group through read_settings.
DATA_SCHEMAS: dict[str, type] = {
    "data_synthetic": DataConfig,
    "data_coco": CocoDataConfig,
    "data_coco_stream": CocoStreamDataConfig,
    "data_shards": ShardsDataConfig,
}


def register_config_schemas() -> None:
    """Store every schema as ``schema/<group>`` in Hydra's ConfigStore (idempotent)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for name, schema in {**SCHEMAS, **DATA_SCHEMAS}.items():
        store.store(group="schema", name=name, node=schema)


def read_settings(cfg: DictConfig, group: str) -> Any:
    """``cfg.<group>`` as its dataclass, interpolations resolved and every range checked.

    Works on a composed config (already typed) and on a plain one (tests, scripts): the values are
    merged into the schema first, so a wrong type is a :class:`ConfigError` either way.
    """
    try:
        values = OmegaConf.to_container(cfg[group], resolve=True)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{group}: {str(exc).splitlines()[0].strip()}") from None
    return _checked(SCHEMAS[group], values, group)


def read_run_settings(cfg: DictConfig) -> RunConfig:
    """The top-level keys of :class:`RunConfig` (missing ones at their defaults), every range
    checked; one ``error:`` line for ``fingerprint_bits=0`` or ``seed=abc``, whichever task runs."""
    names = [name for name in RunConfig.__dataclass_fields__ if name in cfg]
    try:
        values = {name: cfg[name] for name in names}  # scalars: reading one resolves it
    except OmegaConfBaseException as exc:
        raise ConfigError(str(exc).splitlines()[0].strip()) from None
    return _checked(RunConfig, values, None)


def _checked(schema: type, values: Any, label: str | None) -> Any:
    """``values`` merged into ``schema`` and built (so ``__post_init__`` runs): one ConfigError,
    led by ``label`` (None: the key OmegaConf names)."""
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), values))
    except OmegaConfBaseException as exc:
        cause = exc.__cause__ if isinstance(exc.__cause__, ConfigError) else None
        if cause is not None:  # __post_init__'s own message, wrapped by OmegaConf
            raise cause from None
        reason = str(exc).splitlines()[0].strip()
        raise ConfigError(f"{label or getattr(exc, 'full_key', None) or 'config'}: {reason}") from None
