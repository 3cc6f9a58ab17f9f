"""Which metrics the evaluation gate compares: scores where higher is better, by name."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dicomai.errors import DicomaiError
from dicomai.rollout.gate import gate_metrics, read_evaluation


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
