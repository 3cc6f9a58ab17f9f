"""Evaluation metrics against scikit-learn's on the same predictions."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from dicomai.evaluation.metrics import auc, compute_metrics, decisions, youden_threshold
from dicomai.training.datasets import Task


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("k", [2, 4])
def test_single_label_metrics_equal_scikit_learn(k: int) -> None:
    rng = np.random.default_rng(k)
    targets = rng.integers(0, k, 300)
    probabilities = softmax(rng.normal(size=(300, k)) + 1.5 * np.eye(k)[targets])
    task = Task.BINARY if k == 2 else Task.MULTICLASS
    thresholds = np.full(k, 0.4)
    m = compute_metrics(probabilities, targets, task, tuple("abcd"[:k]), thresholds)
    said = decisions(probabilities, task, thresholds)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(targets, said))
    for average in ("macro", "weighted"):
        p, r, f, _ = skm.precision_recall_fscore_support(
            targets, said, average=average, zero_division=0
        )
        assert (m[f"precision_{average}"], m[f"recall_{average}"], m[f"f1_{average}"]) == (
            pytest.approx(p),
            pytest.approx(r),
            pytest.approx(f),
        )
    onehot = np.eye(k)[targets]
    assert m["auc_micro"] == pytest.approx(
        skm.roc_auc_score(onehot, probabilities, average="micro")
    )
    assert m["auc_macro"] == pytest.approx(
        skm.roc_auc_score(onehot, probabilities, average="macro")
    )
    assert m["confusion_matrix"] == skm.confusion_matrix(targets, said).tolist()
    if k == 2:
        assert m["brier"] == pytest.approx(skm.brier_score_loss(targets, probabilities[:, 1]))
        tn, fp, fn, tp = skm.confusion_matrix(targets, said).ravel()
        assert m["sensitivity"] == pytest.approx(tp / (tp + fn))
        assert m["specificity"] == pytest.approx(tn / (tn + fp))
        assert m["ppv"] == pytest.approx(tp / (tp + fp))
        assert m["npv"] == pytest.approx(tn / (tn + fn))
    else:
        assert m["brier"] == pytest.approx(skm.brier_score_loss(targets, probabilities))


def test_a_test_set_of_one_class_leaves_the_other_sides_rates_undefined() -> None:
    # Positives only: no specificity to measure (null in evaluation.json, skipped by the gate),
    # where 0.0 would read as a model that never clears a negative.
    targets = np.ones(20, dtype=np.int64)
    probabilities = softmax(np.random.default_rng(0).normal(size=(20, 2)))
    m = compute_metrics(probabilities, targets, Task.BINARY, ("normal", "nodule"), np.full(2, 0.5))
    assert np.isnan(m["specificity"]) and np.isnan(m["auc_macro"])
    assert 0.0 <= m["sensitivity"] <= 1.0


def test_multilabel_metrics_equal_scikit_learn() -> None:
    rng = np.random.default_rng(1)
    targets = (rng.random((200, 3)) < 0.3).astype(np.float32)
    probabilities = 1 / (1 + np.exp(-(rng.normal(size=(200, 3)) + 2 * targets - 1)))
    thresholds = np.array([0.5, 0.4, 0.6])
    m = compute_metrics(probabilities, targets, Task.MULTILABEL, ("a", "b", "c"), thresholds)
    said = (probabilities >= thresholds).astype(int)
    assert m["accuracy"] == pytest.approx(skm.accuracy_score(targets, said))
    assert m["f1_macro"] == pytest.approx(skm.f1_score(targets, said, average="macro"))
    assert m["f1_weighted"] == pytest.approx(skm.f1_score(targets, said, average="weighted"))
    assert m["auc_macro"] == pytest.approx(skm.roc_auc_score(targets, probabilities))
    assert m["auc_micro"] == pytest.approx(
        skm.roc_auc_score(targets, probabilities, average="micro")
    )
    assert m["confusion_matrix"] == skm.multilabel_confusion_matrix(targets, said).tolist()


def test_calibration_errors_of_a_known_case() -> None:
    # Confidence 0.9 everywhere, right 60 % of the time: ECE = MCE = 0.3.
    probabilities = np.tile([0.9, 0.1], (10, 1))
    targets = np.array([0] * 6 + [1] * 4)
    m = compute_metrics(probabilities, targets, Task.BINARY, ("x", "y"), np.full(2, 0.5), 0)
    assert m["ece"] == pytest.approx(0.3) and m["mce"] == pytest.approx(0.3)
    assert m["reliability"] == [
        {"lower": pytest.approx(0.8), "upper": pytest.approx(0.9),
         "confidence": pytest.approx(0.9), "accuracy": pytest.approx(0.6), "count": 10}
    ]  # fmt: skip


def test_youden_threshold_separates_separable_scores() -> None:
    scores = np.array([0.1, 0.2, 0.3, 0.7, 0.8])
    truth = np.array([0, 0, 0, 1, 1])
    assert youden_threshold(scores, truth) == 0.7
    assert youden_threshold(scores, np.zeros(5)) == 0.5


@pytest.mark.parametrize("order", [[0, 1, 2, 3], [3, 2, 1, 0]])
def test_the_auc_of_scores_that_are_not_numbers_is_undefined(order: list[int]) -> None:
    # An epoch whose network put out NaN scored 1.0 or 0.0 by image order, and could be kept
    # as the best epoch.
    scores = np.array([np.nan, np.nan, np.nan, 0.3])[order]
    truth = np.array([1, 0, 1, 0])[order]
    assert np.isnan(auc(scores, truth))
