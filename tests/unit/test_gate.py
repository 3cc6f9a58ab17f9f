"""Which metrics the evaluation gate compares: scores where higher is better, by name."""

from __future__ import annotations

from dicomai.rollout.gate import gate_metrics


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
