"""One set of attack names, used by the training run's robustness probes, the collusion sweep and
the README: a *case* is an attack name followed by ``_``-separated tokens, ``c<N>`` for the number
of colluders and a number (with an optional one-letter unit prefix: ``q50``, ``s1``) for the
strength. ``none_c1``, ``average_c3``, ``jpeg_q50``, ``gaussian_blur_s1``, ``weight_noise_0.05``.
Hydra's basic sweeper takes the cartesian product of its lists, which is why attack, strength and
colluder count travel as one string.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

from fingerprint_lm.attacks.collusion import IMAGE_MERGES, MERGES
from fingerprint_lm.attacks.image import IMAGE_ATTACKS
from fingerprint_lm.attacks.model import STATE_ATTACK_PLUGINS
from fingerprint_lm.errors import ConfigError, check_int

MODEL_ATTACKS: tuple[str, ...] = ("weight_noise", "prune", "quantize_int8", "quantize_fp16", "quantize_bf16", "finetune")
OUTPUT_ATTACKS: tuple[str, ...] = ("estimate_remove", "spectral_remove")


def attack_names() -> tuple[str, ...]:
    """Every attack a case may name, the registered plug-ins included."""
    return ("none", *MERGES, *IMAGE_MERGES, *IMAGE_ATTACKS, *MODEL_ATTACKS, *STATE_ATTACK_PLUGINS, *OUTPUT_ATTACKS)


def attack_kind(attack: str) -> str:
    """What an attack works on: ``none``, ``merge`` (c copies' weights), ``image_collusion`` (c
    copies' images), ``image``, ``model`` (one copy's weights) or ``output`` (one copy's outputs).
    Sweep points record it, so summaries group plug-ins without importing them."""
    if attack == "none":
        return "none"
    for kind, names in (("merge", MERGES), ("image_collusion", IMAGE_MERGES), ("image", IMAGE_ATTACKS),
                        ("model", (*MODEL_ATTACKS, *STATE_ATTACK_PLUGINS)), ("output", OUTPUT_ATTACKS)):
        if attack in names:
            return kind
    raise ConfigError(f"unknown attack {attack!r}; expected one of {', '.join(attack_names())}")


# The built-in attacks: the names taken at import, before any plug-in registers (register_*).
BUILTIN_ATTACKS: frozenset[str] = frozenset(attack_names())

# The image attacks every trained model is probed with (``metrics.json``: ``robust/<case>``); the
# collusion sweep's default grid scores the same cases on issued copies (tests/test_configs.py).
ROBUSTNESS_SUITE: tuple[str, ...] = (
    "jpeg_q90", "jpeg_q50", "crop_resize_0.5", "crop_0.5", "shift_1", "shift_8", "rotation_10",
    "gaussian_blur_s1", "gaussian_noise_0.05", "brightness_1.5", "combined",
)

_STRENGTH = re.compile(r"^[a-z]?(\d+(?:\.\d+)?)$")
_COLLUDERS = re.compile(r"^c(\d+)$")


def parse_case(case: str) -> tuple[str, float | None, int]:
    """``"average_c3"`` -> ``("average", None, 3)``, ``"jpeg_q50"`` -> ``("jpeg", 50.0, 1)``.
    Merges need ``c >= 2``; every other attack works on one copy."""
    text, known = str(case), attack_names()
    names = sorted((n for n in known if text == n or text.startswith(n + "_")), key=len, reverse=True)
    if not names:
        raise ConfigError(
            f"unknown attack case {case!r}: expected <attack>[_<strength>][_c<N>] with attack one "
            f"of {', '.join(known)}"
        )
    attack = names[0]
    strength, colluders = None, 1
    for token in filter(None, text[len(attack) :].split("_")):
        if match := _COLLUDERS.match(token):
            colluders = int(match.group(1))
        elif (match := _STRENGTH.match(token)) and strength is None:
            strength = float(match.group(1))
        else:
            raise ConfigError(f"attack case {case!r}: cannot read {token!r} (c<N> or a strength)")
    check_point(attack, strength, colluders)
    return attack, strength, colluders


def check_point(attack: str, strength: float | None, colluders: int) -> None:
    known = attack_names()
    if attack not in known:
        raise ConfigError(f"unknown attack {attack!r}; expected one of {', '.join(known)}")
    check_int("colluders", colluders)
    collusion = attack_kind(attack) in ("merge", "image_collusion")  # attacks of c >= 2 copies
    if collusion and colluders < 2 and attack != "average":
        raise ConfigError(f"collusion {attack!r} needs at least 2 colluders, got {colluders}")
    if not collusion and colluders != 1:
        raise ConfigError(f"attack {attack!r} works on one copy; colluders must be 1, got {colluders}")
    needs_strength = (
        attack in IMAGE_ATTACKS and attack != "combined" or attack in ("weight_noise", "prune", "finetune")
    )
    if needs_strength and strength is None:
        raise ConfigError(f"attack {attack!r} needs a strength (e.g. {attack}_0.5)")


_NAME_TOKEN = re.compile(r"^[a-z][a-z0-9]*$")


def _check_plugin(name: str, attack: Callable) -> None:
    words = str(name).split("_")
    if not all(_NAME_TOKEN.match(w) and not _COLLUDERS.match(w) and not _STRENGTH.match(w) for w in words):
        raise ConfigError(
            f"attack name {name!r}: lowercase words joined by '_', none of them a strength (q50, 0.5) or c<N>"
        )
    if name in BUILTIN_ATTACKS:
        raise ConfigError(f"attack {name!r} is built in; give the plug-in another name")
    if not callable(attack):
        raise ConfigError(f"attack {name!r}: {type(attack).__name__} is not callable (add _partial_: true?)")
    # Every task registers the config's plug-ins anew, so a plug-in's name may be registered again,
    # even as another kind: it then leaves its old table (one name, one attack).
    for table in (IMAGE_ATTACKS, STATE_ATTACK_PLUGINS, MERGES):
        table.pop(name, None)


def register_image_attack(name: str, attack: Callable) -> None:
    """Make ``attack`` (``fn(images, strength, generator=None)``, images in ``[-1, 1]``) an image
    attack called ``name``: cases then name it like a built-in one, ``<name>_<strength>`` (the
    ``conf/attacks/`` group's plug-ins, built with ``_target_``). An attack may return a smaller
    image (a cut without resize): fidelity is then measured against the same cut of the base
    decoder's output. A built-in name cannot be replaced; a plug-in's can (every task registers
    the config's plug-ins anew)."""
    _check_plugin(name, attack)
    IMAGE_ATTACKS[name] = attack


def register_model_attack(name: str, attack: Callable) -> None:
    """Make ``attack`` (``fn(state_dict, strength, generator=None) -> state_dict``: one copy's VAE
    tensors in, the attacked ones out with the same keys and shapes, inputs untouched) a model
    attack called ``name`` (``<name>[_<strength>]``; strength None when the case gives none). A
    ``carrier`` copy's state dict also holds its bias map (``<site>.bias_map``): the user holds
    that file too."""
    _check_plugin(name, attack)
    STATE_ATTACK_PLUGINS[name] = attack


def register_merge(name: str, merge: Callable) -> None:
    """Make ``merge`` (``fn(state_dicts, generator=None) -> state_dict``: the c colluders' copies in
    (same keys and shapes, a ``carrier`` copy's bias map included), one model with those keys and
    shapes out, inputs untouched) a collusion called ``name`` (``<name>_c<N>``)."""
    _check_plugin(name, merge)
    MERGES[name] = merge


def image_case(case: str) -> Callable[[torch.Tensor, torch.Generator | None], torch.Tensor]:
    """The image attack a case names, as ``attack(images, generator)``."""
    attack, strength, _ = parse_case(case)
    if attack not in IMAGE_ATTACKS:
        raise ConfigError(f"{case!r} is not an image attack; expected one of {', '.join(IMAGE_ATTACKS)}")
    function = IMAGE_ATTACKS[attack]
    return lambda images, generator=None: function(images, strength, generator)
