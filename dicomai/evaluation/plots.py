"""Figures of training and evaluation as PNG files (matplotlib, Agg: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np

from dicomai.evaluation.metrics import roc_curve


def plot_history(path: Path, history: list[dict[str, float]]) -> None:
    """Training and validation loss, and validation accuracy, AUC and F1, by epoch."""
    epochs = [row["epoch"] for row in history]
    figure, (losses, scores) = plt.subplots(1, 2, figsize=(10, 4))
    losses.plot(epochs, [row["train_loss"] for row in history], "o-", label="training")
    losses.plot(epochs, [row["val_loss"] for row in history], "o-", label="validation")
    losses.set(xlabel="epoch", ylabel="loss", title="Loss")
    losses.legend()
    for key in ("val_accuracy", "val_auc", "val_f1"):
        scores.plot(epochs, [row[key] for row in history], "o-", label=key.removeprefix("val_"))
    scores.set(xlabel="epoch", ylabel="validation", title="Validation metrics", ylim=(0, 1.02))
    scores.legend()
    _save(figure, path)


def plot_roc(
    path: Path, probabilities: np.ndarray, onehot: np.ndarray, classes: tuple[str, ...]
) -> None:
    """One ROC curve per class (one vs rest) and the micro-average."""
    figure, axes = plt.subplots(figsize=(5.5, 5))
    curves = [(name, probabilities[:, c], onehot[:, c]) for c, name in enumerate(classes)]
    curves.append(("micro-average", probabilities.ravel(), onehot.ravel()))
    for name, scores, truth in curves:
        if truth.all() or not truth.any():
            continue
        fpr, tpr, _ = roc_curve(scores, truth)
        style = "--" if name == "micro-average" else "-"
        axes.plot(fpr, tpr, style, label=f"{name} (AUC {np.trapezoid(tpr, fpr):.3f})")
    axes.plot([0, 1], [0, 1], ":", color="grey")
    axes.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC curves")
    axes.legend(loc="lower right", fontsize="small")
    _save(figure, path)


def plot_reliability(path: Path, reliability: list[dict[str, Any]], ece: float) -> None:
    """Accuracy against confidence per bin, with the diagonal of perfect calibration."""
    figure, axes = plt.subplots(figsize=(5.5, 5))
    lower = [b["lower"] for b in reliability]
    widths = [b["upper"] - b["lower"] for b in reliability]
    axes.bar(lower, [b["accuracy"] for b in reliability], width=widths, align="edge",
             edgecolor="black", alpha=0.7, label="observed")  # fmt: skip
    axes.plot([b["confidence"] for b in reliability], [b["accuracy"] for b in reliability], "o",
              color="black", label="bin mean confidence")  # fmt: skip
    axes.plot([0, 1], [0, 1], ":", color="grey", label="perfect calibration")
    axes.set(xlabel="confidence", ylabel="accuracy", title=f"Reliability (ECE {ece:.3f})",
             xlim=(0, 1), ylim=(0, 1))  # fmt: skip
    axes.legend(loc="upper left", fontsize="small")
    _save(figure, path)


def plot_risk_coverage(path: Path, curves: dict[str, np.ndarray], error_rate: float) -> None:
    """Risk (error rate) of the answers kept against the share kept, least uncertain first, per
    uncertainty measure, with the constant risk of an uncertainty that tells nothing."""
    figure, axes = plt.subplots(figsize=(5.5, 5))
    for name, risks in curves.items():
        coverage = np.arange(1, len(risks) + 1) / len(risks)
        axes.plot(coverage, risks, "-", label=f"{name} (AURC {risks.mean():.3f})")
    axes.axhline(error_rate, linestyle=":", color="grey", label="uninformative")
    top = max(0.05, error_rate * 2.5)
    axes.set(xlabel="coverage (share of images answered)", ylabel="risk (error rate)",
             title="Risk against coverage", xlim=(0, 1), ylim=(0, top))  # fmt: skip
    axes.legend(loc="upper left", fontsize="small")
    _save(figure, path)


def plot_misclassified(
    path: Path, items: list[tuple[np.ndarray, np.ndarray | None, str]], columns: int = 4
) -> None:
    """A grid of images (grey (H, W) or RGB (H, W, 3), in [0, 1]) with their heat maps over
    them and a caption."""
    rows = max(1, -(-len(items) // columns))
    figure, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3.2 * rows), squeeze=False)
    for axis in axes.ravel():
        axis.axis("off")
    for axis, (image, heatmap, caption) in zip(axes.ravel(), items, strict=False):
        if image.ndim == 3:
            axis.imshow(image)
        else:
            axis.imshow(image, cmap="gray", vmin=0, vmax=1)
        if heatmap is not None:
            axis.imshow(heatmap, cmap="jet", alpha=0.35, vmin=0, vmax=1)
        axis.set_title(caption, fontsize=8)
    if not items:
        axes[0, 0].text(0.5, 0.5, "no misclassified images", ha="center", va="center")
    _save(figure, path)


def _save(figure: Any, path: Path) -> None:
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
