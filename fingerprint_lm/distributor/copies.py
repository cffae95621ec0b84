"""Issuing a user's personal copy of the VAE, loading it back, and checking it against the registry.

A copy is made without retraining: the user's code goes through the private mapping network once,
the per-channel PNM coefficients are written into the copy's GroupNorm weights, and the user's
Anti-Collusion Transformation (ACT) reparametrizes the decoder. Layout of a copy folder::

    config.json                              stock diffusers AutoencoderKL config
    diffusion_pytorch_model.safetensors      stock AutoencoderKL weights (encoder + personal decoder)
    fingerprint_bias_map.safetensors         the spatial carrier bias map (method=carrier only)

A ``method=pnm`` copy is the two stock files and nothing else: ``AutoencoderKL.from_pretrained``
is the user's fingerprinted decoder. (How a code becomes these tensors:
:func:`fingerprint_lm.methods.base.personal_tensors`.)

Limitation of ``method=carrier``. Its affine sites (``norm2`` of ResnetBlocks) are plain GroupNorm
weight/bias values, which a stock load reproduces exactly. The spatial site's bias map is a
tile-periodic ``[C, T, T]`` map added after ``conv_norm_out``: no stock diffusers parameter can
hold it. It ships as a separate file, and :func:`load_copy` (stock load + one module swap keeping
the parameter names) rebuilds the full fingerprinted decoder. A stock load gives the decoder
*without* the carrier: what the main path carries on its own (``eval/bit_acc_carriers_removed``).

Neither the mapping network, the affine heads, the carriers nor the extractor ever enter a copy;
nor does the ACT secret (only its HMAC-derived per-user seed is used, and it is not stored).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import diffusers
import numpy as np
import torch
from diffusers import AutoencoderKL
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from fingerprint_lm.errors import CheckpointError, ConfigError, RegistryError
from fingerprint_lm.methods.base import personal_tensors
from fingerprint_lm.models.act import ACT_TYPES, derive_act_seed
from fingerprint_lm.models.checkpoint import FingerprintModel
from fingerprint_lm.models.pnm import tile_to
from fingerprint_lm.models.vae import load_vae
from fingerprint_lm.registry.store import Registry
from fingerprint_lm.storage import atomic_directory, update_with_file

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
BIAS_MAP_NAME = "fingerprint_bias_map.safetensors"
# The files a copy's hash covers, in this order. config.json holds no weights, but an edited one
# (another activation, another latent scaling) changes what the weights compute.
HASHED_FILES = (CONFIG_NAME, WEIGHTS_NAME, BIAS_MAP_NAME)
# Registries written before config.json was hashed hold hashes over these: still accepted, with a
# warning that the copy's config.json was not checked.
LEGACY_HASHED_FILES = (WEIGHTS_NAME, BIAS_MAP_NAME)
# The bias map's tensor is named ``<site>.bias_map`` (e.g. ``decoder.conv_norm_out.bias_map``).
# Metadata stays a single key: safetensors writes a multi-key metadata dict in arbitrary order,
# which would make the file bytes, and so the registered hash, differ between runs.
_BIAS_MAP_SUFFIX = ".bias_map"
# User ids become folder names: no separators, no leading dot, printable ASCII only.
_USER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}$")


# -- secret ---------------------------------------------------------------------------------------
def read_secret(env_name: str | None, file_path: str | Path | None = None) -> bytes:
    """The distributor's ACT secret: the file ``file_path`` when given, else the environment
    variable ``env_name``. Never logged, stored in the registry or written into a copy.

    Raises :class:`ConfigError` (naming where it looked, never the value) when it is missing or empty.
    """
    if file_path:
        path = Path(file_path)
        try:
            secret = path.read_bytes().strip()
        except OSError as exc:
            raise ConfigError(f"cannot read the ACT secret file {path}: {exc.strerror or exc}") from exc
        if not secret:
            raise ConfigError(f"the ACT secret file {path} is empty")
        return secret
    secret = os.environ.get(env_name or "", "").strip().encode("utf-8")
    if not secret:
        raise ConfigError(
            f"no ACT secret: set the environment variable {env_name} or distributor.secret_file "
            "(or issue with act=none)"
        )
    return secret


def code_rng(code_seed: int | None, user_id: str) -> np.random.Generator | None:
    """The generator a user's code is drawn from: None (OS entropy) unless ``code_seed`` is set,
    then seeded by ``(code_seed, user_id)`` so that a replayed experiment draws the same codes."""
    if code_seed is None:
        return None
    digest = hashlib.sha256(user_id.encode("utf-8")).digest()
    return np.random.default_rng([int(code_seed), int.from_bytes(digest[:8], "little")])


def check_user_id(user_id: object) -> str:
    """Return ``user_id`` if it can name a registry row and a copy folder; RegistryError otherwise."""
    if not isinstance(user_id, str) or not _USER_ID.match(user_id):
        raise RegistryError(
            f"invalid user id {user_id!r}: use 1-128 letters, digits or ._@+- (not starting with ._@+-)"
        )
    return user_id


# -- files ----------------------------------------------------------------------------------------
def copy_sha256(path: str | Path, files: tuple[str, ...] = HASHED_FILES) -> str:
    """SHA-256 over the copy's files in the fixed order of ``files`` (:data:`HASHED_FILES`).

    For each file present, the hash takes its name, a NUL byte, its size as 8 little-endian
    bytes, then its contents, so removing, truncating or altering any of them changes the hash.
    """
    path = Path(path)
    if not (path / WEIGHTS_NAME).is_file():
        raise CheckpointError(f"no copy at {path} ({WEIGHTS_NAME} missing)")
    digest = hashlib.sha256()
    for name in files:
        file = path / name
        if not file.is_file():
            continue
        digest.update(name.encode() + b"\0" + file.stat().st_size.to_bytes(8, "little"))
        update_with_file(digest, file)
    return digest.hexdigest()


def check_copy_hash(path: str | Path, expected: str, whose: str = "the expected hash") -> str:
    """The copy's :func:`copy_sha256` if it equals ``expected``; a hash registered before
    config.json was hashed (:data:`LEGACY_HASHED_FILES`) is accepted with a warning. Otherwise
    :class:`CheckpointError`: a truncated or altered copy."""
    actual = copy_sha256(path)
    if actual == expected:
        return actual
    if copy_sha256(path, LEGACY_HASHED_FILES) == expected:
        log.warning("copy %s: its hash was registered before config.json was hashed; config.json not checked", path)
        return expected
    raise CheckpointError(f"copy {path} does not match {whose} (truncated or altered)")


def write_copy(
    directory: str | Path,
    vae_config: Mapping,
    state_dict: Mapping[str, torch.Tensor],
    bias_map: torch.Tensor | None = None,
    bias_map_site: str | None = None,
) -> str:
    """Write a copy folder atomically (temporary sibling + rename); returns its :func:`copy_sha256`.

    Refuses to replace an existing folder: a copy, once issued, is never silently overwritten.
    """
    directory = Path(directory)
    try:
        with atomic_directory(directory, overwrite=False) as tmp:
            _write_config(tmp, vae_config)
            save_file({k: v.contiguous() for k, v in state_dict.items()}, tmp / WEIGHTS_NAME, metadata={"format": "pt"})
            if bias_map is not None:
                if not bias_map_site:
                    raise ConfigError("a bias map needs the name of its site")
                save_file({f"{bias_map_site}{_BIAS_MAP_SUFFIX}": bias_map.detach().contiguous()},
                          tmp / BIAS_MAP_NAME, metadata={"format": "pt"})
            sha = copy_sha256(tmp)
            # safetensors writes private files; a copy is meant to be handed out, whatever the umask
            os.chmod(tmp, 0o755)
            for file in tmp.iterdir():
                os.chmod(file, 0o644)
    except FileExistsError as exc:
        raise CheckpointError(f"{exc}; remove it or choose another user id") from None
    return sha


def _write_config(directory: Path, config: Mapping) -> None:
    # What save_pretrained writes: the class name first, then the constructor arguments.
    body = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    header = {"_class_name": "AutoencoderKL", "_diffusers_version": diffusers.__version__}
    (directory / CONFIG_NAME).write_text(json.dumps({**header, **body}, indent=2, sort_keys=True) + "\n")


# -- issuing --------------------------------------------------------------------------------------
@contextlib.contextmanager
def _user_lock(locks: Path, user_id: str) -> Iterator[None]:
    """An exclusive lock per user id; the kernel drops it when its holder dies (kill -9 included),
    so a copy folder met under the lock is never one another live issue is about to register."""
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / user_id, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _remove_interrupted_issue(target: Path) -> None:
    """Remove what an issue killed before it registered left behind: its temporary folders
    (``.<user>.*``, from :func:`write_copy`) and an unregistered copy holding only copy files.
    Anything else in the way is the user's and is refused."""
    for stale in target.parent.glob(f".{target.name}.*"):
        if stale.is_dir():
            log.warning("removing %s, left by an interrupted issue", stale)
            shutil.rmtree(stale, ignore_errors=True)
    if not target.exists():
        return
    if target.is_dir() and {p.name for p in target.iterdir()} <= {CONFIG_NAME, WEIGHTS_NAME, BIAS_MAP_NAME}:
        log.warning("removing %s: written by an interrupted issue, never registered nor handed out", target)
        shutil.rmtree(target)
        return
    raise CheckpointError(f"{target} already exists but {target.name!r} is not registered; remove it first")


def issue_copy(
    model: FingerprintModel,
    registry: Registry,
    user_id: str,
    copies_dir: str | Path,
    secret: bytes | None = None,
    act_type: str = "all",
    scale_range: tuple[float, float] = (0.25, 4.0),
    rng: np.random.Generator | None = None,
    act_scope: str = "stream",
    draw_code: Callable[[np.random.Generator], np.ndarray] | None = None,
) -> dict:
    """Issue ``user_id``'s copy: draw a code, build the copy, write it, register it.

    Parameters:
        model: the distributor's trained fingerprint model.
        registry: the user registry; its code length must be the model's fingerprint length.
        user_id: a new user (see :func:`check_user_id`).
        copies_dir: the copy goes to ``copies_dir/<user_id>``.
        secret: the ACT secret (required unless ``act_type == "none"``).
        act_type: one of :data:`~fingerprint_lm.models.act.ACT_TYPES`.
        scale_range: log-uniform range of ACT's group scales.
        act_scope: where ACT acts (:data:`~fingerprint_lm.models.act.ACT_SCOPES`).
        rng: draws the code (default: fresh OS entropy; codes must not be predictable).
        draw_code: ``rng -> code`` (default ``registry.new_code``; screening: ``screening.CodeScreen``, whose
            ``draws`` the registry counts: attribution's bound divides by the screen's pass rate).

    Every check runs before anything is written; if registration fails (e.g. another process
    registered the same id meanwhile) the copy folder is removed again, so the registry and the
    copies folder never disagree. Issuing holds a per-user lock (``issue_locks/<user>`` beside the
    registry file), so what a killed issue left (a temporary folder, or a written but unregistered
    copy that was never handed out) is recognised on the next attempt and removed before the copy
    is made again. Returns ``user_id``, ``copy``, ``copy_sha256``, ``act_type``, ``code_length``, ``has_bias_map``.
    """
    check_user_id(user_id)
    k = model.fingerprint_bits
    if registry.code_length != k:
        raise RegistryError(f"registry {registry.path} holds {registry.code_length}-bit codes, the model {k}")
    if user_id in registry:
        raise RegistryError(f"duplicate user {user_id!r}: already registered")
    if registry.method is not None and registry.method != model.method:
        raise RegistryError(f"registry {registry.path} holds method={registry.method} users, "
                            f"the model is method={model.method}")
    if act_type not in ACT_TYPES:
        raise ConfigError(f"unknown ACT type {act_type!r}; expected one of {', '.join(ACT_TYPES)}")
    if act_type != "none" and not secret:
        raise ConfigError(f"ACT type {act_type!r} needs the distributor's secret")
    target = Path(copies_dir) / user_id
    with _user_lock(Path(registry.path).parent / "issue_locks", user_id):
        if user_id in registry:  # registered by another process while we waited for the lock
            raise RegistryError(f"duplicate user {user_id!r}: already registered")
        _remove_interrupted_issue(target)
        code = (draw_code or registry.new_code)(np.random.default_rng() if rng is None else rng)
        seed = derive_act_seed(secret, user_id) if act_type != "none" else None
        state, bias_map, site = personal_tensors(model, code, act_type, seed, scale_range, act_scope)
        sha = write_copy(target, model.vae.config, state, bias_map, site)
        try:
            registry.register(user_id, code, copy_sha256=sha, act_type=act_type,
                              screened_draws=getattr(draw_code, "draws", None))  # a screen's, for the bound
        except BaseException:
            shutil.rmtree(target, ignore_errors=True)
            raise
    return {
        "user_id": user_id,
        "copy": str(target),
        "copy_sha256": sha,
        "act_type": act_type,
        "code_length": k,
        "has_bias_map": bias_map is not None,
    }


def verify_copy(path: str | Path, registry: Registry, user_id: str) -> dict:
    """Check a copy folder against the hash registered for ``user_id``.

    Raises :class:`RegistryError` for an unknown user and :class:`CheckpointError` for a missing,
    truncated or altered copy. Returns ``user_id``, ``copy``, ``copy_sha256``, ``act_type``, ``ok``.
    """
    row = registry.get(user_id)
    if not (expected := row["copy_sha256"]):
        raise RegistryError(f"user {user_id!r} has no copy hash in the registry")
    actual = check_copy_hash(path, expected, f"the registered hash of {user_id!r}")
    return {"user_id": user_id, "copy": str(path), "copy_sha256": actual, "act_type": row["act_type"], "ok": True}


# -- loading --------------------------------------------------------------------------------------
class BiasMapGroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` plus a fixed tile-periodic bias map added to its output.

    Keeps ``weight``/``bias`` (names and values), so the VAE's state dict stays a stock one; the
    map is a non-persistent buffer: it follows ``.to()`` but is not saved by ``save_pretrained``.

    Parameters:
        num_groups, num_channels, eps, affine: as ``nn.GroupNorm``.
        bias_map (`torch.Tensor` of shape `(1, C, T, T)`): the tile.
    """

    def __init__(self, num_groups: int, num_channels: int, bias_map: torch.Tensor, eps: float = 1e-5,
                 affine: bool = True):
        super().__init__(num_groups, num_channels, eps=eps, affine=affine)
        self.register_buffer("bias_map", bias_map.detach().clone(), persistent=False)

    @classmethod
    def from_group_norm(cls, norm: nn.GroupNorm, bias_map: torch.Tensor) -> BiasMapGroupNorm:
        new = cls(norm.num_groups, norm.num_channels, bias_map, eps=norm.eps, affine=norm.affine)
        new.load_state_dict(norm.state_dict())
        return new.to(norm.weight.device, norm.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + tile_to(self.bias_map, x.shape[-2:])


def read_bias_map(path: str | Path) -> tuple[torch.Tensor, str]:
    """``(bias_map [1, C, T, T], site)`` from a copy's :data:`BIAS_MAP_NAME` file."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
            if len(keys) != 1 or not keys[0].endswith(_BIAS_MAP_SUFFIX):
                raise CheckpointError(f"{path} is not a fingerprint bias map (tensors {keys[:3]})")
            bias_map = handle.get_tensor(keys[0])
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}".splitlines()[0]) from exc
    if bias_map.dim() != 4 or bias_map.shape[0] != 1 or bias_map.shape[-1] != bias_map.shape[-2]:
        raise CheckpointError(f"{path} is not a fingerprint bias map (shape {tuple(bias_map.shape)})")
    return bias_map, keys[0][: -len(_BIAS_MAP_SUFFIX)]


def load_copy(path: str | Path, expected_sha256: str | None = None):
    """Load a user's copy as the full fingerprinted ``AutoencoderKL``.

    Stock ``AutoencoderKL.from_pretrained(path)`` (all of it for a ``method=pnm`` copy), then, if
    the copy has a bias map (``method=carrier``), the spatial
    site's GroupNorm (``decoder.conv_norm_out``) is swapped for a :class:`BiasMapGroupNorm` with
    the same parameters. The result decodes exactly as the distributor's PNM decoder with the
    user's code. ``expected_sha256`` (e.g. from the registry) is checked first when given.
    """
    path = Path(path)
    if expected_sha256 is not None:
        check_copy_hash(path, expected_sha256)
    vae = load_vae(path)
    bias_file = path / BIAS_MAP_NAME
    if bias_file.is_file():
        bias_map, site = read_bias_map(bias_file)
        attach_bias_map(vae, bias_map, site, source=bias_file)
    return vae.eval()


def decoder_from_tensors(vae_config, state: dict[str, torch.Tensor], bias_map: torch.Tensor | None,
                         site: str | None):
    """What :func:`load_copy` builds, from a copy's tensors instead of its folder: a stock
    ``AutoencoderKL`` with ``state`` loaded and, with a bias map, the site's GroupNorm swapped for a
    :class:`BiasMapGroupNorm` (the collusion sweep decodes attacked and merged copies this way)."""
    vae = AutoencoderKL.from_config(vae_config)
    vae.load_state_dict(state)
    if bias_map is not None:
        attach_bias_map(vae, bias_map, site)
    return vae.eval().requires_grad_(False)


def attach_bias_map(vae, bias_map: torch.Tensor, site: str, source: str | Path = "bias map"):
    """Swap the GroupNorm at ``site`` for a :class:`BiasMapGroupNorm` adding ``bias_map``
    (in place; returns ``vae``). ``source`` names the map's origin in errors."""
    try:
        norm = vae.get_submodule(site)
    except AttributeError as exc:
        raise CheckpointError(f"{source}: site {site!r} is not a module of the VAE") from exc
    if not isinstance(norm, nn.GroupNorm) or norm.num_channels != bias_map.shape[1]:
        raise CheckpointError(f"{source}: site {site!r} is not a GroupNorm of {bias_map.shape[1]} channels")
    parent_name, _, child = site.rpartition(".")
    setattr(vae.get_submodule(parent_name), child, BiasMapGroupNorm.from_group_norm(norm, bias_map))
    return vae
