"""Training losses beyond plain cross-entropy: the multi-task classification + segmentation loss."""

from __future__ import annotations

import torch
from torch.nn import functional as F


def dice_loss(mask_logits: torch.Tensor, masks: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - soft Dice of sigmoid(`mask_logits`) against binary `masks`, averaged over images.

    Parameters
    ----------
    mask_logits
        (N, 1, H, W) or (N, H, W) logits.
    masks
        The true masks, same number of pixels per image, 0/1 (any dtype).
    smooth
        Added to numerator and denominator: an empty mask predicted empty scores 1.
    """
    probabilities = torch.sigmoid(mask_logits).flatten(1)
    truth = masks.to(probabilities.dtype).flatten(1)
    overlap = (probabilities * truth).sum(dim=1)
    total = probabilities.sum(dim=1) + truth.sum(dim=1)
    return (1.0 - (2.0 * overlap + smooth) / (total + smooth)).mean()


def multitask_loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    mask_logits: torch.Tensor,
    masks: torch.Tensor,
    alpha: float = 0.7,
    label_smoothing: float = 0.1,
) -> torch.Tensor:
    """alpha·CE(label smoothing) + (1 - alpha)·(0.5·Dice + 0.5·BCE): the documents' loss.

    Parameters
    ----------
    logits
        (N, C) class logits.
    targets
        (N,) true classes.
    mask_logits
        (N, 1, H, W) lesion logits.
    masks
        (N, H, W) or (N, 1, H, W) true lesion masks, 0/1; all zero for an image without one.
    alpha
        Weight of the classification term, in [0, 1].
    label_smoothing
        Of the cross-entropy; the documents use 0.1.

    Returns
    -------
    torch.Tensor
        The scalar loss.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    classification = F.cross_entropy(logits, targets, label_smoothing=label_smoothing)
    truth = masks.reshape(mask_logits.shape).to(mask_logits.dtype)
    segmentation = 0.5 * dice_loss(mask_logits, truth) + 0.5 * F.binary_cross_entropy_with_logits(
        mask_logits, truth
    )
    return alpha * classification + (1.0 - alpha) * segmentation


def dice_scores(mask_logits: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Per image, the Dice of the predicted mask (probability > 0.5) with the true one.

    Parameters
    ----------
    mask_logits
        (N, 1, H, W) or (N, H, W) logits.
    masks
        The true masks, 0/1, as many pixels per image.

    Returns
    -------
    torch.Tensor
        float32 (N,); NaN for an image whose true mask is empty (no lesion to find).
    """
    predicted = (mask_logits > 0).flatten(1).float()
    truth = (masks > 0).flatten(1).float()
    overlap = (predicted * truth).sum(dim=1)
    total = predicted.sum(dim=1) + truth.sum(dim=1)
    dice = 2.0 * overlap / total.clamp(min=1.0)
    return torch.where(truth.sum(dim=1) > 0, dice, torch.full_like(dice, float("nan")))
