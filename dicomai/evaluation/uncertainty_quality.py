"""How well a model's uncertainty tells its errors apart (the "uncertainty quality metrics" of
the model documents, seed 002): the risk-coverage curve and its area, the AUROC of the
uncertainty as a detector of errors, and its Spearman correlation with them.

A radiologist reads the uncertainty as "look twice at this one": it is worth showing only if
the wrong answers are the uncertain ones. Calibration (ECE) says whether a probability means
what it says; these say whether the uncertainty ranks the errors first.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from dicomai.evaluation.metrics import auc
from dicomai.inference.uncertainty import Summary
from dicomai.training.datasets import Task

# Coverages at which the report gives the risk: the share of images the model answers alone
# when the most uncertain rest go to a radiologist first.
COVERAGES = (0.5, 0.8, 0.9, 1.0)


def risk_coverage(uncertainty: np.ndarray, errors: np.ndarray) -> np.ndarray:
    """Risk (error rate) among the k least uncertain answers, for k = 1..N.

    Answers of equal uncertainty have no order among them: within such a group the risk is
    its expectation over their orders (errors counted pro rata), so the curve does not depend
    on how a sort broke ties.

    Returns
    -------
    numpy.ndarray
        (N,) float64: element k-1 is the risk at coverage k/N.
    """
    uncertainty = np.asarray(uncertainty, dtype=np.float64)
    wrong = np.asarray(errors, dtype=bool)
    order = np.argsort(uncertainty, kind="mergesort")
    ranked, hits = uncertainty[order], wrong[order]
    ends = np.r_[np.flatnonzero(np.diff(ranked)), len(ranked) - 1] + 1
    starts = np.r_[0, ends[:-1]]
    cumulative = np.r_[0, np.cumsum(hits)]
    expected = np.empty(len(ranked), dtype=np.float64)
    for start, end in zip(starts, ends, strict=True):
        before, within = cumulative[start], cumulative[end] - cumulative[start]
        taken = np.arange(1, end - start + 1)
        expected[start:end] = before + within * taken / (end - start)
    return expected / np.arange(1, len(ranked) + 1)


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation (ties get their mean rank); NaN if either is constant."""
    rx, ry = _ranks(np.asarray(x, dtype=np.float64)), _ranks(np.asarray(y, dtype=np.float64))
    if np.ptp(rx) == 0 or np.ptp(ry) == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def _ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.arange(1, len(values) + 1)
    for value in np.unique(values):
        tied = values == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def quality(uncertainty: np.ndarray, errors: np.ndarray) -> dict[str, Any]:
    """AUROC, AURC (area under the risk-coverage curve: lower is better), Spearman's rho and
    the risk at `COVERAGES`, of one uncertainty measure against the errors."""
    if len(uncertainty) == 0:
        raise ValueError("no answers to measure")
    if not np.isfinite(uncertainty).all():
        nan = float("nan")
        return {"auroc": nan, "aurc": nan, "spearman": nan, "risk_at_coverage": {}}
    risks = risk_coverage(uncertainty, errors)
    n = len(risks)
    return {
        "auroc": auc(uncertainty, errors),
        "aurc": float(risks.mean()),
        "spearman": spearman(uncertainty, errors),
        "risk_at_coverage": {
            f"{c:g}": float(risks[max(math.ceil(c * n), 1) - 1]) for c in COVERAGES
        },
    }


def measures(
    summary: Summary, predicted: np.ndarray, targets: np.ndarray, task: Task, samples: int
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Each uncertainty measure the package yields, per answer, and which answers are wrong.

    Single-label: per image, the predictive entropy of the mean probabilities, and with
    several passes (MC dropout, an ensemble) the spread of the predicted class's probability
    (what the SR reports) and the mutual information (the passes' disagreement).
    Multi-label: per image and class, the binary entropy and, with several passes, the spread.
    """
    if task is Task.MULTILABEL:
        p = np.clip(summary.mean, 1e-12, 1 - 1e-12)
        errors = (np.asarray(predicted) != np.asarray(targets)).ravel()
        found = {"entropy": (-(p * np.log(p) + (1 - p) * np.log(1 - p))).ravel()}
        if samples > 1:
            found["std"] = summary.std.ravel()
        return found, errors
    errors = np.asarray(predicted) != np.asarray(targets)
    found = {"entropy": summary.entropy}
    if samples > 1:
        chosen = np.asarray(predicted, dtype=int)
        found["std"] = summary.std[np.arange(len(chosen)), chosen]
        found["mutual_information"] = summary.mutual_information
    return found, errors


def uncertainty_report(
    summary: Summary,
    predicted: np.ndarray,
    targets: np.ndarray,
    task: Task,
    method: str,
    samples: int,
    errors: np.ndarray | None = None,
) -> dict[str, Any]:
    """`quality` of each of the `measures`, with the method and the number of errors.

    `errors` (bool per image), when given, says which answers are wrong in place of the
    predicted class against the target: a multi-class model's SR reports its findings each
    at its own threshold, and an image is wrong where any of them is.
    """
    found, wrong = measures(summary, predicted, targets, task, samples)
    errors = wrong if errors is None else np.asarray(errors, dtype=bool)
    return {
        "method": method,
        "samples": samples,
        "answers": int(errors.size),
        "errors": int(errors.sum()),
        "measures": {name: quality(values, errors) for name, values in found.items()},
    }
