"""Learning-rate schedules: linear warm-up, then cosine annealing to a floor, or a cut of the
rate whenever the validation metric stops improving (model document 003)."""

from __future__ import annotations

import math
from typing import Any

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


class WarmupPlateau:
    """Linear warm-up over `warmup_steps` optimiser steps, then the rate multiplied by
    `factor` whenever the monitored validation metric has not improved for `patience`
    epochs, never below `min_lr` (Keras' and torch's ReduceLROnPlateau).

    `step` is called once per optimiser step, as `warmup_cosine`'s schedule is; `epoch_end`
    once per epoch with the monitored value.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        warmup_steps: int,
        higher_is_better: bool,
        patience: int,
        factor: float,
        min_lr: float,
    ) -> None:
        self._warmup = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / (max(0, warmup_steps) + 1))
        )
        self._plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer,
            mode="max" if higher_is_better else "min",
            factor=factor,
            patience=patience,
            min_lr=min_lr,
        )
        self._optimizer = optimizer
        self._warmup_steps = max(0, warmup_steps)
        self._steps = 0

    def step(self) -> None:
        self._steps += 1
        if self._steps <= self._warmup_steps:
            self._warmup.step()

    def epoch_end(self, value: float) -> None:
        if self._steps >= self._warmup_steps and not math.isnan(value):
            self._plateau.step(value)

    def get_last_lr(self) -> list[float]:
        return [float(group["lr"]) for group in self._optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {
            "warmup": self._warmup.state_dict(),
            "plateau": self._plateau.state_dict(),
            "steps": self._steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._warmup.load_state_dict(state["warmup"])
        self._plateau.load_state_dict(state["plateau"])
        self._steps = int(state["steps"])
