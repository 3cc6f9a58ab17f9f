"""The objective a training run minimises, chosen by name.

``ce``: cross-entropy with label smoothing and optional class weights (single-label);
``focal``: focal loss (Lin et al., ICCV 2017), softmax for single-label, sigmoid for multi-label;
``bce``: binary cross-entropy per class with optional positive weights (multi-label);
``multitask``: `dicomai.training.losses.multitask_loss` of class logits and lesion-mask logits
against classes and masks (single-label, for networks that also segment).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from dicomai.errors import DatasetError
from dicomai.training.losses import multitask_loss

LOSSES = ("ce", "focal", "bce", "multitask")


@dataclass(frozen=True)
class LossSettings:
    """Which loss and its knobs; ``class_weights`` is ``"none"`` or ``"balanced"``.

    ``multitask_alpha`` weighs classification against segmentation in the multitask loss.
    """

    name: str = "ce"
    label_smoothing: float = 0.1
    class_weights: str = "none"
    focal_gamma: float = 2.0
    multitask_alpha: float = 0.7


class Objective(nn.Module):
    """Loss of logits (N, C) against class indices (N,) or multi-hot targets (N, C)."""

    def __init__(
        self, settings: LossSettings, multilabel: bool, weights: torch.Tensor | None
    ) -> None:
        super().__init__()
        self.settings = settings
        self.multilabel = multilabel
        self.register_buffer("weights", weights)
        self.weights: torch.Tensor | None

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        name = self.settings.name
        if self.multilabel:
            targets = targets.float()
            if name == "focal":
                return _sigmoid_focal(logits, targets, self.settings.focal_gamma, self.weights)
            return F.binary_cross_entropy_with_logits(logits, targets, pos_weight=self.weights)
        if name == "focal":
            return _softmax_focal(logits, targets, self.settings.focal_gamma, self.weights)
        return F.cross_entropy(
            logits, targets, weight=self.weights, label_smoothing=self.settings.label_smoothing
        )


class MultitaskObjective(nn.Module):
    """Loss of class logits (N, C) and mask logits (N, 1, H, W) against classes and masks."""

    def __init__(self, settings: LossSettings) -> None:
        super().__init__()
        self.settings = settings

    def forward(
        self,
        logits: torch.Tensor,
        targets: torch.Tensor,
        mask_logits: torch.Tensor,
        masks: torch.Tensor,
    ) -> torch.Tensor:
        return multitask_loss(
            logits.float(),
            targets,
            mask_logits.float(),
            masks,
            alpha=self.settings.multitask_alpha,
            label_smoothing=self.settings.label_smoothing,
        )


def build_objective(
    settings: LossSettings, targets: np.ndarray, multilabel: bool
) -> Objective | MultitaskObjective:
    """The objective for a training set's `targets` (class indices, or multi-hot rows).

    ``balanced`` class weights are ``N / (C * count)`` per class for single-label data and
    ``negatives / positives`` per class (BCE's ``pos_weight``) for multi-label data.

    Raises
    ------
    DatasetError
        On a loss that does not fit the task (``bce`` for single-label, ``ce`` or ``multitask``
        for multi-label), class weights with ``multitask``, an alpha outside [0, 1] or an
        unknown name.
    """
    if settings.name not in LOSSES:
        raise DatasetError(f"unknown loss {settings.name!r} (known: {', '.join(LOSSES)})")
    if settings.name == "multitask":
        return _multitask(settings, multilabel)
    if multilabel and settings.name == "ce":
        raise DatasetError("loss ce is for single-label data; use bce or focal for multi-label")
    if not multilabel and settings.name == "bce":
        raise DatasetError("loss bce is for multi-label data; use ce or focal")
    if settings.class_weights not in ("none", "balanced"):
        raise DatasetError(f"class weights {settings.class_weights!r}: use none or balanced")
    weights = None
    if settings.class_weights == "balanced":
        weights = torch.from_numpy(_balanced(targets, multilabel)).float()
    return Objective(settings, multilabel, weights)


def _multitask(settings: LossSettings, multilabel: bool) -> MultitaskObjective:
    if multilabel:
        raise DatasetError("the multitask loss is for single-label data; use --no-masks")
    if settings.class_weights != "none":
        raise DatasetError("the multitask loss takes no class weights; use --class-weights none")
    if not 0.0 <= settings.multitask_alpha <= 1.0:
        raise DatasetError(f"multitask alpha must be in [0, 1], got {settings.multitask_alpha}")
    return MultitaskObjective(settings)


def _balanced(targets: np.ndarray, multilabel: bool) -> np.ndarray:
    if multilabel:
        positives = targets.sum(axis=0)
        return (len(targets) - positives) / np.maximum(positives, 1.0)
    counts = np.bincount(targets, minlength=int(targets.max()) + 1).astype(np.float64)
    return len(targets) / (len(counts) * np.maximum(counts, 1.0))


def _softmax_focal(
    logits: torch.Tensor, targets: torch.Tensor, gamma: float, weights: torch.Tensor | None
) -> torch.Tensor:
    log_p = F.log_softmax(logits, dim=1).gather(1, targets[:, None])[:, 0]
    loss = -((1.0 - log_p.exp()) ** gamma) * log_p
    if weights is not None:
        loss = loss * weights[targets]
    return loss.mean()


def _sigmoid_focal(
    logits: torch.Tensor, targets: torch.Tensor, gamma: float, weights: torch.Tensor | None
) -> torch.Tensor:
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_true = torch.exp(-bce)
    loss = (1.0 - p_true) ** gamma * bce
    if weights is not None:
        loss = loss * torch.where(targets > 0, weights, torch.ones_like(weights))
    return loss.mean()
