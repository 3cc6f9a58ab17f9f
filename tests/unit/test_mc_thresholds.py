"""What a trained package claims of its validation set is what the daemon does on it: with MC
dropout the thresholds and ``[metrics]`` are those of the mean of the MC passes, a threshold
does not sit on the score of the image that defines it, and the training record holds only
the loss settings that were applied.

The packages are tinycnn trained on 32² synthetic PNG folders for a few epochs.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from dicomai.evaluation.metrics import decisions
from dicomai.evaluation.report import evaluate_package
from dicomai.imaging.spec import InputSpec
from dicomai.models.manifest import UncertaintySpec
from dicomai.models.package import load_model
from dicomai.training.datasets import Task
from dicomai.training.fit import FitSettings
from dicomai.training.objectives import LossSettings
from dicomai.training.package_writer import below_cut, choose_thresholds
from dicomai.training.runs import RunSettings, train_package
from dicomai.training.strategies import StrategySettings
from dicomai.training.synthetic import synthesize

SIZE = 32


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``train/`` and an explicit ``val/`` split, so the validation images are known."""
    root = tmp_path_factory.mktemp("mc_pngs")
    data = synthesize(48, size=SIZE, seed=3)
    for i, (image, label) in enumerate(zip(data.images, data.labels, strict=True)):
        split = "val" if i % 3 == 0 else "train"
        path = root / split / ("nodule" if label else "normal") / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), np.rint(image * 255).astype(np.uint8))
    return root


def run_settings(data: Path, out: Path, **changes: object) -> RunSettings:
    """Two epochs of tinycnn on the CPU, one seed."""
    fit = FitSettings(epochs=2, batch_size=8, seed=1, warmup_epochs=0, num_workers=0)
    return RunSettings(
        data=data,
        out=out,
        name="mc",
        spec=InputSpec(size=(SIZE, SIZE)),
        strategy=StrategySettings(lr=3e-3),
        fit=fit,
        device="cpu",
        **changes,  # type: ignore[arg-type]
    )


def test_an_mc_dropout_package_claims_the_metrics_evaluate_measures_on_its_validation_set(
    folders: Path, tmp_path: Path
) -> None:
    # Thresholds and [metrics] came from one deterministic pass while the daemon decides on
    # the mean of the MC passes: a package claiming validation sensitivity 1.0 reported all
    # its validation nodules Absent.
    manifest = train_package(
        run_settings(
            folders,
            tmp_path / "run",
            options={"dropout": 0.5},
            uncertainty=UncertaintySpec("mc_dropout", passes=8, seed=5),
        ),
        log=lambda _: None,
    )
    report = evaluate_package(
        tmp_path / "run" / "package", folders, tmp_path / "eval", split="val", log=lambda _: None
    )
    claimed = manifest.metrics
    assert claimed["val_n"] == report["data"]["n"] == 16
    for key in ("accuracy", "sensitivity", "specificity", "auc_macro", "brier", "ece"):
        assert claimed[f"val_{key}"] == pytest.approx(report[key], abs=2e-6), key
    assert "MC-dropout passes" in manifest.training["validation"]
    assert load_model(tmp_path / "run" / "package").manifest.temperature == manifest.temperature


def test_a_threshold_lies_midway_below_the_score_that_defines_it() -> None:
    # The threshold was the exact score of the lowest flagged positive; the daemon computed
    # that image's score again 1e-9 lower and reported it Absent.
    positive = np.array([0.9, 0.7, 0.6])
    negative = np.array([0.2, 0.5, 0.3])
    scores = np.concatenate([positive, negative])
    targets = np.array([1, 1, 1, 0, 0, 0])
    probabilities = np.stack([1.0 - scores, scores], axis=1)
    chosen = choose_thresholds(probabilities, targets, Task.BINARY)
    assert chosen[1] == pytest.approx(0.55)
    assert chosen[0] == pytest.approx(0.45 + 1e-9)
    recomputed = probabilities + np.array([1e-9, -1e-9])
    assert (decisions(recomputed, Task.BINARY, chosen) == targets).all()
    # Per class (multi-label, multi-class): the same, rounded where that stays between.
    labels = np.stack([targets, 1 - targets], axis=1)
    per_class = choose_thresholds(np.stack([scores, 1.0 - scores], axis=1), labels, Task.MULTILABEL)
    assert per_class.tolist() == pytest.approx([0.55, 0.45])


def test_a_threshold_that_is_no_score_or_the_lowest_is_kept() -> None:
    scores = np.array([0.2, 0.4, 0.4 + 4e-7])
    assert below_cut(scores, 0.5) == 0.5  # an undefined J's default
    assert below_cut(scores, 0.2) == 0.2  # nothing lower to go to
    # Rounding to 6 decimals would land on 0.4: the midpoint stays unrounded.
    assert 0.4 < below_cut(scores, 0.4 + 4e-7, digits=6) < 0.4 + 4e-7


def test_a_focal_run_records_no_label_smoothing(folders: Path, tmp_path: Path) -> None:
    # Focal loss ignores label smoothing; the package recorded the default 0.1 all the same.
    manifest = train_package(
        run_settings(folders, tmp_path / "run", loss=LossSettings(name="focal")),
        log=lambda _: None,
    )
    recorded = load_model(tmp_path / "run" / "package").manifest.training["loss"]
    assert recorded["name"] == "focal"
    assert "label_smoothing" not in recorded
    assert manifest.training["loss"] == recorded
