"""A small, honest training loop: stratified hold-out, AdamW, one-cycle LR, temperature fit."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from dicomai.imaging.preprocess import to_model_input
from dicomai.imaging.spec import InputSpec
from dicomai.models.architectures import build
from dicomai.training.losses import dice_scores, multitask_loss

Log = Callable[[str], None]


@dataclass(frozen=True)
class Split:
    """Indices of the training and validation images."""

    train: np.ndarray
    val: np.ndarray


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> Split:
    """Hold out `val_fraction` of each class (at least one image of each) for validation.

    Parameters
    ----------
    labels
        int (N,) class indices.
    val_fraction
        Fraction of each class held out, in (0, 1).
    seed
        Seed of the shuffle.

    Returns
    -------
    Split
        Sorted index arrays that partition ``range(N)``.
    """
    rng = np.random.default_rng(seed)
    val: list[np.ndarray] = []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        held = max(1, round(len(members) * val_fraction)) if len(members) > 1 else 0
        val.append(members[:held])
    val_idx = np.sort(np.concatenate(val)) if val else np.empty(0, np.int64)
    train_idx = np.setdiff1d(np.arange(len(labels)), val_idx)
    return Split(train=train_idx, val=val_idx)


def model_inputs(images: np.ndarray, spec: InputSpec) -> torch.Tensor:
    """Preprocess grayscale images in [0, 1] exactly as inference does: (N, 3, H, W) float32."""
    return torch.from_numpy(np.stack([to_model_input(image, spec) for image in images]))


def train_classifier(
    architecture: str,
    images: np.ndarray,
    labels: np.ndarray,
    spec: InputSpec,
    *,
    epochs: int = 10,
    lr: float = 3e-3,
    seed: int = 0,
    batch_size: int = 32,
    options: dict[str, Any] | None = None,
    num_classes: int | None = None,
    val_fraction: float = 0.2,
    weight_decay: float = 1e-4,
    masks: np.ndarray | None = None,
    alpha: float = 0.7,
    log: Log = print,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train a network from scratch on grayscale images and calibrate it.

    The images go through `dicomai.imaging.preprocess.to_model_input` with `spec`, the same
    path inference uses. Training uses AdamW with a one-cycle learning rate, cross-entropy
    with label smoothing 0.1 and random horizontal flips; the held-out validation set picks
    nothing (no early stopping), it only measures, and fits the softmax temperature.

    With `masks`, a network that also segments (one with ``forward_multitask``) trains on
    `dicomai.training.losses.multitask_loss` instead, each mask flipped with its image, and
    the metrics add ``val_dice``.

    Parameters
    ----------
    architecture
        A name known to `dicomai.models.architectures.build`.
    images
        float32 (N, rows, cols) in [0, 1].
    labels
        int (N,) class indices.
    spec
        The model's input specification.
    epochs, lr, seed, batch_size, weight_decay
        Optimisation settings; the same seed gives the same model on the same machine.
    options
        Architecture options (e.g. ``{"dropout": 0.2}``).
    masks
        bool or 0/1 (N, rows, cols) lesion masks, all zero for an image without a lesion.
    alpha
        Weight of the classification term of the multitask loss (with `masks` only).
    num_classes
        Number of outputs; by default ``max(labels) + 1``.
    val_fraction
        Fraction of each class held out for validation.
    log
        Receives one progress line per epoch.

    Returns
    -------
    tuple[torch.nn.Module, dict]
        The trained network in eval mode, and metrics: validation accuracy, per-class recall,
        ROC AUC (two classes), NLL before and after calibration, the fitted temperature,
        set sizes, settings and the training time.
    """
    started = time.perf_counter()
    labels = np.asarray(labels, dtype=np.int64)
    classes = num_classes if num_classes is not None else int(labels.max()) + 1
    split = stratified_split(labels, val_fraction, seed)
    inputs = model_inputs(images, spec)
    targets = torch.from_numpy(labels)
    torch.manual_seed(seed)
    # channels_last: 2.3x faster training steps of tinycnn on 2 CPU cores (measured, 128²).
    model = build(architecture, classes, **(options or {})).to(memory_format=torch.channels_last)
    if masks is not None and not hasattr(model, "forward_multitask"):
        raise ValueError(f"{architecture} does not segment; train it without masks")
    inputs = inputs.contiguous(memory_format=torch.channels_last)
    train = (inputs[split.train], targets[split.train])
    val = (inputs[split.val], targets[split.val])
    truth = None if masks is None else torch.from_numpy(np.asarray(masks, dtype=np.float32))
    settings = {
        "epochs": epochs,
        "lr": lr,
        "batch_size": batch_size,
        "seed": seed,
        "weight_decay": weight_decay,
    }
    if truth is not None:
        settings["alpha"] = alpha
    losses = _fit(model, train, val, settings, log, None if truth is None else truth[split.train])
    metrics = evaluate(model, *val)
    if truth is not None:
        metrics["val_dice"] = _dice(model, val[0], truth[split.val])
    metrics.update(
        n_train=len(split.train),
        n_val=len(split.val),
        final_train_loss=round(losses[-1], 4),
        seconds=round(time.perf_counter() - started, 1),
        **settings,
    )
    return model.eval(), metrics


def _fit(
    model: nn.Module,
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    settings: dict[str, Any],
    log: Log,
    masks: torch.Tensor | None = None,
) -> list[float]:
    """Run the epochs; return the mean training loss of each (multitask with `masks`)."""
    inputs, targets = train
    generator = torch.Generator().manual_seed(int(settings["seed"]))
    steps = math.ceil(len(inputs) / settings["batch_size"])
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=settings["lr"], weight_decay=settings["weight_decay"]
    )
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=settings["lr"], total_steps=settings["epochs"] * steps
    )
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    losses = []
    for epoch in range(settings["epochs"]):
        model.train()
        order = torch.randperm(len(inputs), generator=generator)
        total = 0.0
        for batch in order.split(settings["batch_size"]):
            flip = torch.rand(len(batch), generator=generator) < 0.5
            x = _flipped(inputs[batch], flip)
            if masks is None:
                loss = criterion(model(x), targets[batch])
            else:
                logits, mask_logits = _segmenting(model)(x)
                loss = multitask_loss(
                    logits,
                    targets[batch],
                    mask_logits,
                    _flipped(masks[batch][:, None], flip),
                    alpha=settings["alpha"],
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(batch)
        losses.append(total / len(inputs))
        accuracy = _accuracy(model, *val)
        log(
            f"epoch {epoch + 1}/{settings['epochs']}  loss {losses[-1]:.4f}  "
            f"val accuracy {accuracy:.3f}"
        )
    return losses


def _flipped(x: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Mirror the chosen (N, C, H, W) images left-right: a finding may sit in either lung."""
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def _segmenting(model: nn.Module) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The network's ``forward_multitask``: class logits and mask logits."""
    forward: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    forward = model.forward_multitask  # type: ignore[assignment]
    return forward


def _dice(model: nn.Module, inputs: torch.Tensor, masks: torch.Tensor) -> float:
    """Mean Dice of the predicted masks over the images with a lesion (NaN if none has one)."""
    model.eval()
    with torch.inference_mode():
        scores = torch.cat(
            [
                dice_scores(_segmenting(model)(chunk)[1], truth)
                for chunk, truth in zip(inputs.split(128), masks.split(128), strict=True)
            ]
        )
    return round(float(np.nanmean(scores.numpy())), 4) if len(scores) else float("nan")


def predict_logits(model: nn.Module, inputs: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
    """The network's logits in eval mode, float64 (N, classes)."""
    model.eval()
    with torch.inference_mode():
        chunks = [model(chunk) for chunk in inputs.split(batch_size)]
    return torch.cat(chunks).double()


def _accuracy(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> float:
    if len(inputs) == 0:
        return float("nan")
    return float((predict_logits(model, inputs).argmax(1) == targets).double().mean())


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """The temperature T minimising the NLL of softmax(logits / T) (Guo et al., 2017).

    Parameters
    ----------
    logits
        (N, classes) validation logits.
    targets
        (N,) true classes.

    Returns
    -------
    float
        T > 0; 1.0 when there is nothing to fit on.
    """
    if len(logits) == 0:
        return 1.0
    logits = logits.detach().double()
    # Optimise log T: T stays positive without a constraint.
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(logits / log_t.exp(), targets)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp().clamp(0.05, 20.0))


def evaluate(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> dict[str, Any]:
    """Validation metrics of a network, with its temperature fitted on the same images.

    Parameters
    ----------
    model
        The network.
    inputs
        (N, 3, H, W) preprocessed images.
    targets
        (N,) true classes.

    Returns
    -------
    dict
        ``val_accuracy``, ``val_recall`` (per class), ``val_auc`` (two classes only),
        ``val_nll``, ``val_nll_calibrated`` and ``temperature``.
    """
    logits = predict_logits(model, inputs)
    temperature = fit_temperature(logits, targets)
    predicted = logits.argmax(1)
    recall = [
        round(float((predicted[targets == c] == c).double().mean()), 4)
        for c in range(logits.shape[1])
        if bool((targets == c).any())
    ]
    metrics: dict[str, Any] = {
        "val_accuracy": round(float((predicted == targets).double().mean()), 4),
        "val_recall": recall,
        "val_nll": round(float(nn.functional.cross_entropy(logits, targets)), 4),
        "val_nll_calibrated": round(
            float(nn.functional.cross_entropy(logits / temperature, targets)), 4
        ),
        "temperature": round(temperature, 4),
    }
    if logits.shape[1] == 2:
        metrics["val_auc"] = round(roc_auc((logits[:, 1] - logits[:, 0]).numpy(), targets), 4)
    return metrics


def roc_auc(scores: np.ndarray, targets: torch.Tensor | np.ndarray) -> float:
    """Area under the ROC curve of binary `targets` by `scores` (Mann-Whitney, ties halved)."""
    truth = np.asarray(targets).astype(bool)
    positives, negatives = scores[truth], scores[~truth]
    if len(positives) == 0 or len(negatives) == 0:
        return float("nan")
    greater = (positives[:, None] > negatives[None, :]).sum()
    ties = (positives[:, None] == negatives[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(positives) * len(negatives)))
