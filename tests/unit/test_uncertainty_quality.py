"""The uncertainty quality metrics of `dicomai evaluate` (seed 002): risk-coverage, AURC,
AUROC of uncertainty for errors and Spearman's rho, against worked cases and scipy."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as skm

from dicomai.evaluation.uncertainty_quality import quality, risk_coverage, spearman


def test_an_uncertainty_that_ranks_every_error_last_is_perfect() -> None:
    uncertainty = np.array([0.1, 0.2, 0.3, 0.4])
    errors = np.array([False, False, True, True])
    assert risk_coverage(uncertainty, errors).tolist() == pytest.approx([0, 0, 1 / 3, 1 / 2])
    found = quality(uncertainty, errors)
    assert found["auroc"] == 1.0
    assert found["aurc"] == pytest.approx((0 + 0 + 1 / 3 + 1 / 2) / 4)
    assert found["risk_at_coverage"] == pytest.approx(
        {"0.5": 0.0, "0.8": 0.5, "0.9": 0.5, "1": 0.5}
    )


def test_an_uncertainty_that_tells_nothing_scores_as_chance_whatever_the_order() -> None:
    # All tied: the answers kept first are any of them, so the risk is the error rate at every
    # coverage (a sort that happened to put the right answers first would flatter it).
    errors = np.array([True, False, False, True, False, False, False, True])
    found = quality(np.full(len(errors), 0.7), errors)
    assert found["auroc"] == 0.5
    assert found["aurc"] == pytest.approx(errors.mean())
    assert list(found["risk_at_coverage"].values()) == pytest.approx([errors.mean()] * 4)
    assert np.isnan(found["spearman"])


def test_auroc_and_spearman_agree_with_scikit_learn_and_scipy_with_ties() -> None:
    rng = np.random.default_rng(3)
    uncertainty = np.round(rng.random(200), 1)  # many ties
    errors = rng.random(200) < 0.2 + 0.5 * uncertainty
    found = quality(uncertainty, errors)
    assert found["auroc"] == pytest.approx(skm.roc_auc_score(errors, uncertainty))
    assert found["spearman"] == pytest.approx(stats.spearmanr(uncertainty, errors).statistic)
    assert spearman(uncertainty, -uncertainty) == pytest.approx(-1.0)
    # Expected over the orders of ties: the mean of many random tie-breaks.
    draws = []
    for _ in range(400):
        order = np.lexsort((rng.random(200), uncertainty))
        draws.append(np.mean(np.cumsum(errors[order]) / np.arange(1, 201)))
    assert found["aurc"] == pytest.approx(np.mean(draws), abs=2e-3)
