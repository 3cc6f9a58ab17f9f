"""Which metrics the evaluation gate compares: scores where higher is better, by name."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dicomai.db.models import ModelVersion
from dicomai.errors import DicomaiError
from dicomai.rollout.gate import decide, gate_metrics, read_evaluation


def test_scores_are_gated_by_any_word_of_their_name_and_losses_or_spreads_are_not() -> None:
    metrics = {
        "auc_macro": 0.9,  # dicomai evaluate's names: the suffix must not hide the score
        "f1_weighted": 0.7,
        "recall_macro": 0.6,
        "val_accuracy": 0.8,
        "test_sensitivity": 0.85,
        "dice_loss": 0.1,  # lower is better
        "auc_std": 0.02,  # a spread, not a score
        "brier": 0.1,
        "ece": 0.03,
        "n": 60,
        "accuracy_flag": True,  # not a number
        "val_auc_per_class": {"nodule": 0.9},  # a table
    }
    assert gate_metrics(metrics) == {
        "auc_macro": 0.9,
        "f1_weighted": 0.7,
        "recall_macro": 0.6,
        "val_accuracy": 0.8,
        "test_sensitivity": 0.85,
    }


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ('{"auc_macro": 1.5}', "not in [0, 1]"),
        ('{"accuracy": 97}', "0.97, not 97"),
        ('{"auc_macro": 0.9, "sensitivity": NaN}', "sensitivity is nan"),
        ('{"metrics": {"auc": Infinity}}', "auc is inf"),
    ],
)
def test_a_site_evaluation_with_scores_that_are_not_fractions_is_refused(
    tmp_path: Path, text: str, words: str
) -> None:
    path = tmp_path / "evaluation.json"
    path.write_text(text)
    with pytest.raises(DicomaiError, match=re.escape(words)):
        read_evaluation(path)


def test_a_site_evaluation_of_fractions_is_read(tmp_path: Path) -> None:
    path = tmp_path / "evaluation.json"
    path.write_text('{"auc_macro": 0.93, "accuracy": 1}')
    assert read_evaluation(path) == {"auc_macro": 0.93, "accuracy": 1}


def version(number: str, metrics: dict[str, float], evaluation: dict | None = None) -> ModelVersion:
    """A registered version (not stored): its package [metrics] and site evaluation."""
    return ModelVersion(
        name="ct-nodule", version=number, manifest={"metrics": metrics}, evaluation=evaluation
    )


# What `dicomai train` writes into [metrics], and what `dicomai evaluate` writes.
TRAINED = {"val_accuracy": 0.917, "val_auc_macro": 0.944, "val_f1_macro": 0.916, "val_ece": 0.26}


def evaluated(accuracy: float, auc_macro: float) -> dict[str, float]:
    return {"task": "binary", "n": 24, "accuracy": accuracy, "auc_macro": auc_macro, "ece": 0.1}


def test_a_site_evaluation_is_compared_with_the_validation_metrics_dicomai_train_wrote() -> None:
    active = version("1.0.0", TRAINED)

    better = decide(version("1.1.0", TRAINED, evaluated(0.92, 0.95)), active, 0.02)
    worse = decide(version("1.1.0", TRAINED, evaluated(0.80, 0.95)), active, 0.02)

    assert better.passed, better.message
    assert "site evaluation of ct-nodule 1.1.0 against the package metrics" in better.source
    compared = {c.name: (c.active_name, c.active) for c in better.comparisons}
    assert compared == {
        "accuracy": ("val_accuracy", 0.917),
        "auc_macro": ("val_auc_macro", 0.944),
    }
    assert better.detail()["active_names"] == {
        "accuracy": "val_accuracy",
        "auc_macro": "val_auc_macro",
    }
    assert not worse.passed
    assert "accuracy 0.8 < val_accuracy 0.917" in worse.message, worse.message
    assert "auc_macro" not in worse.message


def test_a_packages_test_set_metric_is_preferred_to_its_validation_one() -> None:
    active = version("1.0.0", {"val_accuracy": 0.99, "test_accuracy": 0.85})
    site = {"metrics": {"accuracy": 0.86}}

    decision = decide(version("1.1.0", {}, site), active, 0.0)

    assert decision.passed, decision.message
    [compared] = decision.comparisons
    assert (compared.name, compared.active_name, compared.active) == (
        "accuracy",
        "test_accuracy",
        0.85,
    )


def test_the_gate_still_refuses_a_site_evaluation_with_nothing_comparable() -> None:
    # A multi-class evaluation's decisions are the SR's Present/Absent per finding, training's
    # the most probable class: not the same quantity under any name, so not compared.
    active = version("1.0.0", {"val_accuracy": 0.9, "val_f1_macro": 0.9, "val_auc": 1.0})
    site = {"accuracy_argmax": 0.2, "sensitivity_macro": 0.2, "auc_macro": 0.3, "n": 60}

    decision = decide(version("1.1.0", TRAINED, site), active, 0.02)

    assert not decision.passed and not decision.comparisons
    assert "share no metric" in decision.message
    assert "record a site evaluation of ct-nodule 1.0.0" in decision.message


def test_two_site_evaluations_and_two_packages_compare_their_own_names() -> None:
    active = version("1.0.0", TRAINED, evaluated(0.90, 0.90))
    decision = decide(version("1.1.0", TRAINED, evaluated(0.95, 0.80)), active, 0.02)
    assert not decision.passed and decision.source == "site evaluation"
    assert "auc_macro 0.8 < 0.9" in decision.message, decision.message

    packaged = decide(
        version("1.1.0", {**TRAINED, "val_accuracy": 0.5}), version("1.0.0", TRAINED), 0.02
    )
    assert not packaged.passed and packaged.source == "package metrics"
    assert "val_accuracy 0.5 < 0.917" in packaged.message, packaged.message
