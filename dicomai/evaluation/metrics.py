"""Classification metrics of predicted probabilities: discrimination, decisions and calibration.

Definitions follow scikit-learn's (precision, recall and F1 with ``zero_division=0``; weighted
averages by support; micro ROC-AUC over the one-hot-ravelled matrix; Brier score as
``brier_score_loss``), computed here with numpy alone because scikit-learn is not a runtime
dependency; the tests compare every number with scikit-learn's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from dicomai.inference.types import ClassScore
from dicomai.training.datasets import Task

if TYPE_CHECKING:
    from dicomai.models.package import ClassSpec

CALIBRATION_BINS = 10  # the model documents (seed 002) compute ECE and MCE with n_bins=10


def roc_curve(scores: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """False- and true-positive rates at each distinct score, highest first, from (0, 0).

    Returns
    -------
    tuple of numpy.ndarray
        ``fpr``, ``tpr`` and the thresholds (``score >= threshold`` is positive); the first
        threshold is ``inf``.
    """
    truth = np.asarray(truth).astype(bool)
    order = np.argsort(-scores, kind="mergesort")
    ranked, hits = scores[order], truth[order]
    last_of_ties = np.r_[np.flatnonzero(np.diff(ranked)), len(ranked) - 1]
    tp = np.cumsum(hits)[last_of_ties]
    fp = (last_of_ties + 1) - tp
    positives, negatives = max(int(truth.sum()), 1), max(int((~truth).sum()), 1)
    fpr = np.r_[0.0, fp / negatives]
    tpr = np.r_[0.0, tp / positives]
    return fpr, tpr, np.r_[np.inf, ranked[last_of_ties]]


def auc(scores: np.ndarray, truth: np.ndarray) -> float:
    """Area under the ROC curve (ties count half); NaN without both classes, or when a score is
    not finite (NaN sorted as it came, so an epoch of NaN outputs had scored 0 or 1)."""
    truth = np.asarray(truth).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    if truth.all() or not truth.any() or not np.isfinite(scores).all():
        return float("nan")
    fpr, tpr, _ = roc_curve(np.asarray(scores, dtype=np.float64), truth)
    return float(np.trapezoid(tpr, fpr))


def youden_threshold(scores: np.ndarray, truth: np.ndarray) -> float:
    """The score threshold maximising Youden's J = sensitivity + specificity - 1 (0.5 if undefined).

    Of equally good thresholds the highest is kept (the fewest false positives).
    """
    truth = np.asarray(truth).astype(bool)
    if truth.all() or not truth.any():
        return 0.5
    fpr, tpr, thresholds = roc_curve(np.asarray(scores, dtype=np.float64), truth)
    best = int(np.argmax((tpr - fpr)[1:])) + 1
    return float(np.clip(thresholds[best], 0.0, 1.0))


def decisions(
    probabilities: np.ndarray, task: Task, thresholds: np.ndarray, positive: int = 1
) -> np.ndarray:
    """Predicted classes (N,) (binary: `positive` when its probability reaches its threshold;
    multi-class: the most probable), or multi-hot (N, C) for multi-label."""
    if task is Task.MULTILABEL:
        return (probabilities >= thresholds[None, :]).astype(np.int64)
    if task is Task.BINARY:
        flagged = probabilities[:, positive] >= thresholds[positive]
        return np.where(flagged, positive, 1 - positive).astype(np.int64)
    return probabilities.argmax(axis=1).astype(np.int64)


def compute_metrics(
    probabilities: np.ndarray,
    targets: np.ndarray,
    task: Task,
    classes: tuple[str, ...],
    thresholds: np.ndarray,
    positive: int = 1,
) -> dict[str, Any]:
    """Every metric of `probabilities` (N, C) against `targets` (class indices or multi-hot).

    Parameters
    ----------
    probabilities
        Calibrated probabilities: softmax rows, or per-class sigmoids for multi-label.
    targets
        int (N,) true classes, or (N, C) 0/1 for multi-label.
    task
        The task.
    classes
        Class names, in output order.
    thresholds
        Per-class decision thresholds (used for binary and multi-label decisions).
    positive
        The binary task's positive (finding) class.

    Returns
    -------
    dict
        See `dicomai.evaluation.report` for the keys.
    """
    probabilities = np.asarray(probabilities, dtype=np.float64)
    onehot = _onehot(targets, task, len(classes))
    predicted = decisions(probabilities, task, thresholds, positive)
    predicted_onehot = _onehot(predicted, task, len(classes))
    tp = (predicted_onehot * onehot).sum(axis=0)
    fp = (predicted_onehot * (1 - onehot)).sum(axis=0)
    fn = ((1 - predicted_onehot) * onehot).sum(axis=0)
    support = onehot.sum(axis=0)
    precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    f1 = _ratio(2 * tp, 2 * tp + fp + fn)
    per_class_auc = [auc(probabilities[:, c], onehot[:, c]) for c in range(len(classes))]
    defined = [a for a in per_class_auc if not np.isnan(a)]
    metrics: dict[str, Any] = {
        "task": task.value,
        "n": len(probabilities),
        "accuracy": _accuracy(predicted, targets, task),
        "precision_macro": float(precision.mean()),
        "recall_macro": float(recall.mean()),
        "f1_macro": float(f1.mean()),
        "precision_weighted": _weighted(precision, support),
        "recall_weighted": _weighted(recall, support),
        "f1_weighted": _weighted(f1, support),
        "auc_micro": auc(probabilities.ravel(), onehot.ravel()),
        "auc_macro": float(np.mean(defined)) if defined else float("nan"),
        "brier": _brier(probabilities, onehot, task, positive),
        **calibration(probabilities, targets, task),
        "per_class": {
            name: {
                "precision": float(precision[c]),
                "recall": float(recall[c]),
                "f1": float(f1[c]),
                "support": int(support[c]),
                "auc": per_class_auc[c],
                "threshold": float(thresholds[c]),
            }
            for c, name in enumerate(classes)
        },
        "confusion_matrix": confusion(predicted, targets, task, len(classes)),
    }
    if task is Task.BINARY:
        metrics.update(_binary(tp, fp, fn, onehot, predicted_onehot, positive))
    return metrics


def calibration(
    probabilities: np.ndarray, targets: np.ndarray, task: Task, bins: int = CALIBRATION_BINS
) -> dict[str, Any]:
    """Expected and maximum calibration error over equal-width confidence bins, and the bins.

    Single-label: the confidence of the most probable class against whether it is right
    (Guo et al., 2017). Multi-label: every (image, class) probability against its label.
    """
    if task is Task.MULTILABEL:
        confidence = probabilities.ravel()
        correct = np.asarray(targets, dtype=np.float64).ravel()
    else:
        confidence = probabilities.max(axis=1)
        correct = (probabilities.argmax(axis=1) == targets).astype(np.float64)
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    table = []
    ece, mce = 0.0, 0.0
    for b in range(bins):
        members = index == b
        count = int(members.sum())
        if count == 0:
            continue
        gap = abs(float(correct[members].mean()) - float(confidence[members].mean()))
        ece += gap * count / len(confidence)
        mce = max(mce, gap)
        table.append(
            {
                "lower": float(edges[b]),
                "upper": float(edges[b + 1]),
                "confidence": float(confidence[members].mean()),
                "accuracy": float(correct[members].mean()),
                "count": count,
            }
        )
    return {"ece": ece, "mce": mce, "reliability": table}


def confusion(predicted: np.ndarray, targets: np.ndarray, task: Task, k: int) -> list[Any]:
    """Rows true, columns predicted: (C, C) single-label; per class [[TN, FP], [FN, TP]] else."""
    if task is Task.MULTILABEL:
        return [
            [
                [int(((targets[:, c] == 0) & (predicted[:, c] == 0)).sum()),
                 int(((targets[:, c] == 0) & (predicted[:, c] == 1)).sum())],
                [int(((targets[:, c] == 1) & (predicted[:, c] == 0)).sum()),
                 int(((targets[:, c] == 1) & (predicted[:, c] == 1)).sum())],
            ]
            for c in range(k)
        ]  # fmt: skip
    matrix = np.zeros((k, k), dtype=np.int64)
    np.add.at(matrix, (np.asarray(targets), predicted), 1)
    return matrix.tolist()


def _onehot(targets: np.ndarray, task: Task, k: int) -> np.ndarray:
    if task is Task.MULTILABEL:
        return np.asarray(targets, dtype=np.float64)
    return np.eye(k, dtype=np.float64)[np.asarray(targets, dtype=np.int64)]


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    return np.divide(
        numerator,
        denominator,
        out=np.zeros_like(numerator, dtype=np.float64),
        where=denominator > 0,
    )


def _weighted(values: np.ndarray, support: np.ndarray) -> float:
    total = support.sum()
    return float((values * support).sum() / total) if total > 0 else 0.0


def _accuracy(predicted: np.ndarray, targets: np.ndarray, task: Task) -> float:
    if task is Task.MULTILABEL:
        # scikit-learn's accuracy_score on label indicators: the exact-match (subset) accuracy.
        return float((predicted == np.asarray(targets)).all(axis=1).mean())
    return float((predicted == targets).mean())


def _brier(probabilities: np.ndarray, onehot: np.ndarray, task: Task, positive: int) -> float:
    if task is Task.BINARY:
        return float(((probabilities[:, positive] - onehot[:, positive]) ** 2).mean())
    if task is Task.MULTILABEL:
        return float(((probabilities - onehot) ** 2).mean())
    return float(((probabilities - onehot) ** 2).sum(axis=1).mean())


def _binary(
    tp: np.ndarray,
    fp: np.ndarray,
    fn: np.ndarray,
    onehot: np.ndarray,
    predicted_onehot: np.ndarray,
    positive: int,
) -> dict[str, float]:
    tn = float(((1 - predicted_onehot[:, positive]) * (1 - onehot[:, positive])).sum())
    return _rates(float(tp[positive]), float(fp[positive]), float(fn[positive]), tn)


def _rates(tp: float, fp: float, fn: float, tn: float) -> dict[str, float]:
    # Undefined (NaN, null in evaluation.json, skipped by the gate) when its denominator is
    # empty: a test set of positives only has no specificity, not a specificity of 0.
    undefined = float("nan")
    return {
        "sensitivity": tp / (tp + fn) if tp + fn else undefined,
        "specificity": tn / (tn + fp) if tn + fp else undefined,
        "ppv": tp / (tp + fp) if tp + fp else undefined,
        "npv": tn / (tn + fn) if tn + fn else undefined,
    }


FINDING_RATES = ("sensitivity", "specificity", "ppv", "npv")


def reported_present(probabilities: np.ndarray, specs: tuple[ClassSpec, ...]) -> np.ndarray:
    """bool (N, C): where the daemon's SR says Present, by the daemon's own rule
    (`ClassScore.positive`: finding classes only, each at its own threshold)."""
    return np.array(
        [
            [
                ClassScore(spec.name, spec.code, float(p), spec.threshold, spec.is_finding).positive
                for spec, p in zip(specs, row, strict=True)
            ]
            for row in probabilities
        ],
        dtype=bool,
    ).reshape(len(probabilities), len(specs))


def finding_metrics(
    present: np.ndarray, targets: np.ndarray, classes: tuple[str, ...], findings: np.ndarray
) -> dict[str, Any]:
    """Per finding class, how often its reported Present/Absent was right (one class vs rest).

    For a multi-class model, whose daemon reports each finding class Present or Absent on its
    own threshold (so an image can have several findings Present, or none), rather than the
    single most probable class that `compute_metrics` scores.

    Parameters
    ----------
    present
        bool (N, C): where the daemon reports the class Present.
    targets
        int (N,) true classes.
    classes
        Class names, in output order.
    findings
        bool (C,): which classes are findings (the only ones reported Present or Absent).

    Returns
    -------
    dict
        ``per_class`` {finding name: {sensitivity, specificity, ppv, npv, f1, confusion
        [[TN, FP], [FN, TP]]}}; ``sensitivity_macro``, ``specificity_macro``, ``ppv_macro``,
        ``npv_macro``: their means over the finding classes where defined (NaN where none is).
    """
    truth = np.eye(len(classes), dtype=bool)[np.asarray(targets, dtype=np.int64)]
    present = np.asarray(present, dtype=bool)
    per_class: dict[str, dict[str, Any]] = {}
    for c in np.flatnonzero(findings):
        said, real = present[:, c], truth[:, c]
        tp, fp = int((said & real).sum()), int((said & ~real).sum())
        fn, tn = int((~said & real).sum()), int((~said & ~real).sum())
        per_class[classes[c]] = {
            **_rates(tp, fp, fn, tn),
            "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan"),
            "confusion": [[tn, fp], [fn, tp]],
        }
    macro = {}
    for rate in FINDING_RATES:
        defined = [v[rate] for v in per_class.values() if not np.isnan(v[rate])]
        macro[f"{rate}_macro"] = float(np.mean(defined)) if defined else float("nan")
    return {"per_class": per_class, **macro}
