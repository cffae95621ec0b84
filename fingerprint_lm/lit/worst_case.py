"""The worst-case (minimax) weight perturbation of the training stage (``lit/fingerprinting.py``):
AWP/SAM-style normalised ascent per decoder tensor inside a relative radius."""

from __future__ import annotations

import torch
from torch import nn


def worst_case_perturbation(
    params: list[nn.Parameter], grads: list[torch.Tensor | None], rho: float, previous: list[torch.Tensor] | None = None
) -> list[torch.Tensor]:
    """One normalised ascent step per tensor, projected onto ``||delta_t|| <= rho ||theta_t||``.

    With ``previous`` None the step lands on the ball's surface along the gradient (K = 1).
    Norms and the step are computed in float32 (a bf16 norm over millions of entries is off by
    percents); each delta is returned in its parameter's dtype, ready to add to it."""
    deltas = []
    for i, (param, grad) in enumerate(zip(params, grads)):
        radius = rho * param.detach().float().norm()
        delta = torch.zeros_like(param, dtype=torch.float32) if previous is None else previous[i].float()
        if grad is not None:
            grad = grad.float()
            delta = delta + radius * grad / grad.norm().clamp_min(1e-12)
        norm = delta.norm()
        if norm > radius:
            delta = delta * (radius / norm)
        deltas.append(delta.to(param.dtype))
    return deltas


@torch.no_grad()
def set_perturbed(weights: list[nn.Parameter], originals: list[torch.Tensor],
                  deltas: list[torch.Tensor] | None) -> None:
    """Set ``weights`` to ``originals + deltas`` (``deltas`` None: back to the originals, bit-exact)."""
    for i, (weight, original) in enumerate(zip(weights, originals)):
        weight.copy_(original if deltas is None else original + deltas[i])
