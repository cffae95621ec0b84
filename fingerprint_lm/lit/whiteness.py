"""Keep a learned reader white on unmarked images while it trains.

The band reader's logits are ``gain * W (raw - centre)``, with ``W`` and the centre fitted in
closed form on unmarked decoder outputs. While its filters train, that fit goes stale. Re-fitting
it after training moves the logits training optimised (0.937 held out with the stale whitening,
0.865 re-fitted, in one continuation of the shipped checkpoint); re-fitting it as training goes
stalls learning (experiments/results/whitening_table.md). A penalty on the reader's outputs for a
random batch of unmarked outputs (their mean, and their covariance's distance from the identity,
in units of the gain) keeps the stale fit close to a fresh one, so the re-fit after training moves
little in short runs (experiments/results/whitening_penalty_probe.md). Off by default: over the
12000 steps (the length shipped then) it read 0.854 against the shipped recipe's 0.891.
"""

from __future__ import annotations

import torch


def whiteness_penalty(logits: torch.Tensor, gain: float) -> torch.Tensor:
    """Mean squared of ``logits / gain`` plus the mean squared distance of their covariance from
    the identity: 0 for white logits, up to the batch's sampling noise."""
    v = logits.float() / gain
    centred = v - v.mean(0)
    covariance = centred.T @ centred / (len(v) - 1)
    return v.mean(0).pow(2).mean() + (covariance - torch.eye(v.shape[1], device=v.device)).pow(2).mean()


def pool_penalty(reader, unmarked: torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
    """:func:`whiteness_penalty` of ``reader`` on ``batch`` outputs drawn from the pool ``unmarked``
    (kept on the CPU)."""
    index = torch.randint(0, len(unmarked), (batch,))
    return whiteness_penalty(reader(unmarked[index].to(device)), reader.gain)
