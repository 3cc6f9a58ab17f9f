"""Learning-rate schedules: linear warm-up, then cosine annealing to a floor."""

from __future__ import annotations

import math

import torch


def warmup_cosine(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: int = 0,
    floor: float = 0.01,
) -> torch.optim.lr_scheduler.LambdaLR:
    """Scale each group's learning rate: 0 → 1 over `warmup_steps`, then cosine down to `floor`.

    Parameters
    ----------
    optimizer
        Its groups' ``lr`` are the peak rates.
    total_steps
        Optimiser steps the schedule spans (warm-up included).
    warmup_steps
        Linear warm-up steps; at most half of `total_steps` is used for warm-up.
    floor
        The last step's rate as a fraction of the peak.

    Returns
    -------
    torch.optim.lr_scheduler.LambdaLR
        Step it once per optimiser step.
    """
    total = max(1, total_steps)
    warmup = min(max(0, warmup_steps), total // 2)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total - warmup - 1))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
