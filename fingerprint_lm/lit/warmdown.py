"""The end of a fingerprint training run: every learning rate falls linearly to 0 over its last
steps (a fraction of ``Trainer.max_steps``, so smoke and debug runs keep the same shape), and the
reader may freeze for them.

Why the reader freezes: the extractor's whitening is fitted on unmarked images, so a reader whose
filters train during the run is re-whitened after it, and that re-fit moves every logit away from
the ones training optimised. Re-whitened once at the start of the warm-down and frozen, the reader
keeps the exact whitening training aims at to the end, and the mapping network and decoder
consolidate against it (experiments/results/lr_warmdown_probe.md).
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn


def warmdown_steps(max_steps: int | None, fraction: float) -> int:
    """How many of the run's last steps warm down (0 for an unbounded run: None or negative)."""
    if not fraction or max_steps is None or max_steps < 0:
        return 0
    return max(1, round(fraction * max_steps))


def lr_factor(step: int, max_steps: int | None, warmdown: int) -> float:
    """The learning rates' share of their configured values at optimizer step ``step`` of a run of
    ``max_steps`` whose last ``warmdown`` steps warm down (:func:`warmdown_steps`)."""
    if not warmdown:
        return 1.0
    return min(1.0, max(0, max_steps - step) / warmdown)


def in_warmdown(step: int, max_steps: int | None, warmdown: int) -> bool:
    """Whether optimizer step ``step`` is one of the run's last ``warmdown`` steps (its first
    still runs at the full rates)."""
    return bool(warmdown) and step >= max_steps - warmdown


def set_learning_rates(optimizer, rates: Iterable[float], factor: float) -> None:
    # by position (configure_optimizers' order): a resumed optimizer's groups carry no extra keys
    for group, rate in zip(optimizer.param_groups, rates):
        group["lr"] = rate * factor


def drop_gradients(module: nn.Module) -> None:
    """Leave ``module``'s parameters out of this optimizer step (AdamW skips a parameter whose
    gradient is None). The reader freezes this way rather than through ``requires_grad``: plain
    DDP registers every trainable parameter once and fails when one stops producing a gradient."""
    for param in module.parameters():
        param.grad = None
