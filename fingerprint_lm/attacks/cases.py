"""One set of attack names, used by the training run's robustness probes, the collusion sweep and
the README: a *case* is an attack name followed by ``_``-separated tokens, ``c<N>`` for the number
of colluders and a number (with an optional one-letter unit prefix: ``q50``, ``s1``) for the
strength. ``none_c1``, ``average_c3``, ``jpeg_q50``, ``gaussian_blur_s1``, ``weight_noise_0.05``.
Hydra's basic sweeper takes the cartesian product of its lists, which is why attack, strength and
colluder count travel as one string.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable

import torch

from fingerprint_lm.attacks.collusion import IMAGE_MERGES, MERGES
from fingerprint_lm.attacks.image import FIXED_EDITS, IMAGE_ATTACKS
from fingerprint_lm.attacks.model import STATE_ATTACKS
from fingerprint_lm.errors import ConfigError, check_int

# The model attack that is not a state-dict function: it fine-tunes the copy's decoder on the
# attacker's own images, so the evaluation runs it (evaluation/collusion.py).
TRAINING_ATTACKS: tuple[str, ...] = ("finetune",)
# Attacks on one copy's outputs that need more than the images (the copy's tile, unmarked images of
# the same kind): the evaluation runs them too.
OUTPUT_ATTACKS: tuple[str, ...] = ("estimate_remove", "spectral_remove")

# Every attack that is a function of one signature, by kind: the ``conf/attacks/`` group's
# sections, which name each by its ``_target_`` (register_attack). Plug-ins join these tables.
ATTACK_TABLES: dict[str, dict[str, Callable]] = {
    "image": IMAGE_ATTACKS,            # fn(images, strength, generator=None)
    "model": STATE_ATTACKS,            # fn(state_dict, strength, generator=None)
    "merge": MERGES,                   # fn(state_dicts, generator=None)
    "image_merge": IMAGE_MERGES,       # fn(outputs, generator=None): one [n, 3, H, W] batch per colluder
}


def attack_names() -> tuple[str, ...]:
    """Every attack a case may name, the registered plug-ins included."""
    return ("none", *MERGES, *IMAGE_MERGES, *IMAGE_ATTACKS, *STATE_ATTACKS, *TRAINING_ATTACKS, *OUTPUT_ATTACKS)


def attack_kind(attack: str) -> str:
    """What an attack works on: ``none``, ``merge`` (c copies' weights), ``image_collusion`` (c
    copies' images), ``image``, ``model`` (one copy's weights) or ``output`` (one copy's outputs).
    Sweep points record it, so summaries group plug-ins without importing them."""
    if attack == "none":
        return "none"
    for kind, names in (("merge", MERGES), ("image_collusion", IMAGE_MERGES), ("image", IMAGE_ATTACKS),
                        ("model", (*STATE_ATTACKS, *TRAINING_ATTACKS)), ("output", OUTPUT_ATTACKS)):
        if attack in names:
            return kind
    raise ConfigError(f"unknown attack {attack!r}; expected one of {', '.join(attack_names())}")


# The built-in attacks: the names and functions the tables hold at import, before any plug-in
# registers. The config names the same functions; a built-in name cannot point elsewhere (a cached
# sweep point of ``jpeg_q50`` must mean the same attack).
BUILTIN_FUNCTIONS: dict[str, Callable] = {name: fn for table in ATTACK_TABLES.values() for name, fn in table.items()}
BUILTIN_ATTACKS: frozenset[str] = frozenset(attack_names())

# The image attacks every trained model is probed with (``metrics.json``: ``robust/<case>``); the
# collusion sweep's default grid scores the same cases on issued copies (tests/test_configs.py): every
# image attack of issue 11's target table.
ROBUSTNESS_SUITE: tuple[str, ...] = (
    "jpeg_q90", "jpeg_q50", "crop_resize_0.5", "crop_0.5", "shift_1", "shift_8", "rotation_10",
    "gaussian_blur_s1", "gaussian_noise_0.05", "brightness_1.5", "contrast_1.5", "combined",
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
        attack in IMAGE_ATTACKS and attack not in FIXED_EDITS or attack in ("weight_noise", "prune", "finetune")
    )
    if needs_strength and strength is None:
        raise ConfigError(f"attack {attack!r} needs a strength (e.g. {attack}_0.5)")


_NAME_TOKEN = re.compile(r"^[a-z][a-z0-9]*$")


def register_attack(kind: str, name: str, attack: Callable) -> None:
    """Make ``attack`` the attack called ``name`` of ``kind`` (a key of :data:`ATTACK_TABLES`), so
    cases name it: ``<name>_<strength>`` (image), ``<name>[_<strength>]`` (model), ``<name>_c<N>``
    (merge, image_merge). Every task registers the ``conf/attacks/`` group's entries, built with
    their ``_target_``, at its start.

    A built-in name is accepted only with its own function, of its own kind (the group lists the
    built-ins that way); a new name is a plug-in, and may be registered again, even as another kind:
    it then leaves its old table (one name, one attack)."""
    if kind not in ATTACK_TABLES:
        raise ConfigError(f"unknown attack kind {kind!r}; expected one of {', '.join(ATTACK_TABLES)}")
    if not callable(attack):
        raise ConfigError(f"attack {name!r}: {type(attack).__name__} is not callable (add _partial_: true?)")
    if isinstance(attack, functools.partial) and not attack.args and not attack.keywords:
        attack = attack.func  # what `_target_` + `_partial_: true` builds from a plain function
    if name in BUILTIN_ATTACKS:
        if BUILTIN_FUNCTIONS.get(name) is not attack or ATTACK_TABLES[kind].get(name) is not attack:
            raise ConfigError(f"attack {name!r} is built in; give the plug-in another name")
        return
    words = str(name).split("_")
    if not all(_NAME_TOKEN.match(w) and not _COLLUDERS.match(w) and not _STRENGTH.match(w) for w in words):
        raise ConfigError(
            f"attack name {name!r}: lowercase words joined by '_', none of them a strength (q50, 0.5) or c<N>"
        )
    for table in ATTACK_TABLES.values():
        table.pop(name, None)
    ATTACK_TABLES[kind][name] = attack


def register_image_attack(name: str, attack: Callable) -> None:
    """Make ``attack`` (``fn(images, strength, generator=None)``, images in ``[-1, 1]``) an image
    attack called ``name`` (:func:`register_attack`). An attack may return a smaller image (a cut
    without resize): fidelity is then measured against the same cut of the base decoder's output."""
    register_attack("image", name, attack)


def register_model_attack(name: str, attack: Callable) -> None:
    """Make ``attack`` (``fn(state_dict, strength, generator=None) -> state_dict``: one copy's VAE
    tensors in, the attacked ones out with the same keys and shapes, inputs untouched) a model
    attack called ``name`` (``<name>[_<strength>]``; strength None when the case gives none). A
    ``carrier`` copy's state dict also holds its bias map (``<site>.bias_map``): the user holds
    that file too."""
    register_attack("model", name, attack)


def register_merge(name: str, merge: Callable) -> None:
    """Make ``merge`` (``fn(state_dicts, generator=None) -> state_dict``: the c colluders' copies in
    (same keys and shapes, a ``carrier`` copy's bias map included), one model with those keys and
    shapes out, inputs untouched) a collusion called ``name`` (``<name>_c<N>``)."""
    register_attack("merge", name, merge)


def register_image_merge(name: str, merge: Callable) -> None:
    """Make ``merge`` (``fn(outputs, generator=None) -> images``: one ``[n, 3, H, W]`` batch per
    colluder, of the same content, in; ``n`` suspect images of that shape out) an image collusion
    called ``name`` (``<name>_c<N>``)."""
    register_attack("image_merge", name, merge)


def image_case(case: str) -> Callable[[torch.Tensor, torch.Generator | None], torch.Tensor]:
    """The image attack a case names, as ``attack(images, generator)``."""
    attack, strength, _ = parse_case(case)
    if attack not in IMAGE_ATTACKS:
        raise ConfigError(f"{case!r} is not an image attack; expected one of {', '.join(IMAGE_ATTACKS)}")
    function = IMAGE_ATTACKS[attack]
    return lambda images, generator=None: function(images, strength, generator)
