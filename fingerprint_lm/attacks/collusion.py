"""Collusion: ``c`` users merge their copies' state dicts into one model, or pool their images.

Every merge takes a list of state dicts with the same keys and shapes and returns a new one;
the inputs are untouched. Floating-point tensors are merged element-wise in float64 and stored in
the first copy's dtype; integer buffers are taken from the first copy. A merge of identical copies
returns the copy (up to float64 rounding for :func:`power_mean`).

- :func:`average`: equal weights (the paper's naive colluders).
- :func:`weighted_average`: random Dirichlet weights.
- :func:`max_abs`, :func:`power_mean`, :func:`sign_consensus`: the non-linear merges of the
  paper's sister work and of model-merging practice (TIES).
- :func:`aligned_average` (from ``models.act``): the adaptive colluder, who undoes ACT by matching
  channels before averaging. It needs the GroupNorm group count: ``num_groups=``.

:data:`MERGES` maps names to ``fn(state_dicts, generator=None, **options)``; :func:`merge_copies`
calls one by name and passes ``num_groups`` only where it is needed.

Colluders need not touch the weights: :data:`IMAGE_MERGES` pool the images their copies made of
the same content (``outputs[j]`` is colluder ``j``'s ``[n, 3, H, W]`` batch):

- :func:`image_mix`: each suspect image is one colluder's image (a seeded random colluder per
  image): every image carries one full code, a different one from image to image.
- :func:`image_blend`: each suspect image is the pixelwise mean of the colluders' images.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from fingerprint_lm.errors import ConfigError
from fingerprint_lm.models.act_alignment import aligned_average, average_state_dicts

StateDict = dict[str, torch.Tensor]
Merge = Callable[..., StateDict]

__all__ = [
    "IMAGE_MERGES",
    "MERGES",
    "aligned_average",
    "aligned_average_merge",
    "average",
    "image_blend",
    "image_mix",
    "max_abs",
    "elementwise_merge",
    "merge_copies",
    "power_mean",
    "sign_consensus",
    "weighted_average",
]


def _check(state_dicts: Sequence[Mapping[str, torch.Tensor]]) -> None:
    if len(state_dicts) == 0:
        raise ConfigError("cannot merge zero state dicts")
    first = state_dicts[0]
    for other in state_dicts[1:]:
        if other.keys() != first.keys():
            raise ConfigError("cannot merge state dicts with different keys")
        for key, value in first.items():
            if other[key].shape != value.shape:
                raise ConfigError(
                    f"cannot merge {key}: shapes {tuple(value.shape)} and {tuple(other[key].shape)}"
                )


def elementwise_merge(
    state_dicts: Sequence[Mapping[str, torch.Tensor]], combine: Callable[[torch.Tensor], torch.Tensor]
) -> StateDict:
    """Apply ``combine`` to the float64 stack ``[c, *shape]`` of every floating-point tensor; integer
    buffers come from the first copy. The building block of the element-wise merges here and of
    merge plug-ins (attacks/plugins.py: median_merge)."""
    _check(state_dicts)
    out: StateDict = {}
    for key, value in state_dicts[0].items():
        if not value.is_floating_point():
            out[key] = value.detach().clone()
            continue
        stack = torch.stack([sd[key].detach().double() for sd in state_dicts])
        out[key] = combine(stack).to(value.dtype).contiguous()
    return out


def average(
    state_dicts: Sequence[Mapping[str, torch.Tensor]], generator: torch.Generator | None = None
) -> StateDict:
    """Equal-weight average (``generator`` unused)."""
    _check(state_dicts)
    return average_state_dicts(state_dicts)


def weighted_average(
    state_dicts: Sequence[Mapping[str, torch.Tensor]],
    generator: torch.Generator | None = None,
    concentration: float = 1.0,
) -> StateDict:
    """Average with weights drawn from ``Dirichlet(concentration, ..., concentration)``.

    The weights come from a NumPy generator seeded by one draw of ``generator``, so a seeded torch
    generator fixes them. ``concentration`` 1 is uniform on the simplex; large values approach
    equal weights, small ones a single copy.
    """
    _check(state_dicts)
    if concentration <= 0:
        raise ConfigError(f"Dirichlet concentration must be positive, got {concentration}")
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    weights = np.random.default_rng(seed).dirichlet([concentration] * len(state_dicts))
    return average_state_dicts(state_dicts, weights.tolist())


def max_abs(
    state_dicts: Sequence[Mapping[str, torch.Tensor]], generator: torch.Generator | None = None
) -> StateDict:
    """Per element, the value of largest magnitude (the first copy's on ties)."""

    def combine(stack: torch.Tensor) -> torch.Tensor:
        index = stack.abs().argmax(dim=0, keepdim=True)
        return stack.gather(0, index)[0]

    return elementwise_merge(state_dicts, combine)


def power_mean(
    state_dicts: Sequence[Mapping[str, torch.Tensor]],
    generator: torch.Generator | None = None,
    p: float = 3.0,
) -> StateDict:
    """Signed power mean: ``phi^-1(mean_i phi(x_i))`` with ``phi(x) = sign(x) |x|^p``.

    ``p = 1`` is the average; large ``p`` approaches :func:`max_abs`. Odd-symmetric, so it is
    defined for negative weights too.
    """
    if p <= 0:
        raise ConfigError(f"power mean exponent must be positive, got {p}")

    def combine(stack: torch.Tensor) -> torch.Tensor:
        mean = (stack.sign() * stack.abs().pow(p)).mean(dim=0)
        return mean.sign() * mean.abs().pow(1.0 / p)

    return elementwise_merge(state_dicts, combine)


def sign_consensus(
    state_dicts: Sequence[Mapping[str, torch.Tensor]], generator: torch.Generator | None = None
) -> StateDict:
    """TIES-like merge: per element, elect the sign most copies have (a tie goes to the sign of
    the sum), then average only the entries with that sign. All-zero elements stay zero."""

    def combine(stack: torch.Tensor) -> torch.Tensor:
        signs = stack.sign()
        votes = signs.sum(dim=0)
        elected = torch.where(votes != 0, votes.sign(), stack.sum(dim=0).sign())
        agree = (signs == elected[None]) & (elected[None] != 0)
        count = agree.sum(dim=0)
        total = torch.where(agree, stack, torch.zeros_like(stack)).sum(dim=0)
        return torch.where(count > 0, total / count.clamp_min(1), torch.zeros_like(total))

    return elementwise_merge(state_dicts, combine)


def aligned_average_merge(
    state_dicts: Sequence[Mapping[str, torch.Tensor]],
    generator: torch.Generator | None = None,
    num_groups: int | None = None,
) -> StateDict:
    """The adaptive colluder (:func:`aligned_average`): align every copy to the first, average."""
    if num_groups is None:
        raise ConfigError("the aligned_average merge needs num_groups (the VAE's norm_num_groups)")
    _check(state_dicts)
    return aligned_average(state_dicts, num_groups)


MERGES: dict[str, Merge] = {
    "average": average,
    "weighted_average": weighted_average,
    "max_abs": max_abs,
    "power_mean": power_mean,
    "sign_consensus": sign_consensus,
    "aligned_average": aligned_average_merge,
}


def merge_copies(
    name: str,
    state_dicts: Sequence[Mapping[str, torch.Tensor]],
    generator: torch.Generator | None = None,
    num_groups: int | None = None,
    **options,
) -> StateDict:
    """Merge ``state_dicts`` with the merge called ``name``; ``num_groups`` goes to
    ``aligned_average`` only, ``options`` (``p``, ``concentration``) to the merge itself."""
    if name not in MERGES:
        raise ConfigError(f"unknown merge {name!r}; expected one of {', '.join(MERGES)}")
    if name == "aligned_average":
        return MERGES[name](state_dicts, generator, num_groups=num_groups, **options)
    return MERGES[name](state_dicts, generator, **options)


# -- image-level collusion ------------------------------------------------------------------------
def _check_outputs(outputs: Sequence[torch.Tensor]) -> torch.Tensor:
    if len(outputs) < 2:
        raise ConfigError(f"image collusion needs at least 2 colluders' images, got {len(outputs)}")
    shapes = {tuple(batch.shape) for batch in outputs}
    if len(shapes) != 1 or len(next(iter(shapes))) != 4:
        raise ConfigError(f"colluders' image batches must share one [n, 3, H, W] shape, got {sorted(shapes)}")
    return torch.stack(list(outputs))


def image_mix(outputs: Sequence[torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
    """Image ``i`` from colluder ``owner[i]``, drawn uniformly per image (seeded by ``generator``);
    :func:`mix_owners` gives the same owners for the same generator state."""
    stacked = _check_outputs(outputs)
    owners = mix_owners(len(outputs), stacked.shape[1], generator)
    return stacked[owners, torch.arange(stacked.shape[1])]


def mix_owners(n_colluders: int, n_images: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Which colluder each image of :func:`image_mix` comes from (``int64 [n_images]``)."""
    return torch.randint(0, n_colluders, (n_images,), generator=generator)


def image_blend(outputs: Sequence[torch.Tensor], generator: torch.Generator | None = None) -> torch.Tensor:
    """The pixelwise mean of the colluders' images of the same content."""
    return _check_outputs(outputs).mean(dim=0)


IMAGE_MERGES: dict[str, Callable[..., torch.Tensor]] = {"image_mix": image_mix, "image_blend": image_blend}

