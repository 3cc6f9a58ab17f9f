"""`dicomai evaluate` scores the decisions the daemon reports, and says why a number is missing.

A multi-class daemon reports each finding class Present when its probability reaches that
class's own threshold (`ClassScore.positive`), so an image can have several findings Present or
none; the evaluation must score those Present/Absent answers, not the most probable class.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from dicomai.evaluation.metrics import finding_metrics
from dicomai.evaluation.report import evaluate_package, reported_wrong
from dicomai.imaging.preprocess import to_model_input
from dicomai.imaging.spec import InputSpec
from dicomai.inference.runner import Classifier
from dicomai.inference.types import Code
from dicomai.models.architectures import build
from dicomai.models.package import ClassSpec, Manifest, load_model, write_package
from dicomai.training.datasets import read_image01

SPEC = InputSpec(size=(32, 32))
# mass at 0 is Present on every image; nodule's threshold sits among the network's nodule
# probabilities (0.27 to 0.57 on these images), so that it is Present on some and Absent on
# others, while the most probable class is often another one.
THREE = (
    ClassSpec("mass", Code("4147007", "SCT", "Mass"), 0.0, True),
    ClassSpec("nodule", Code("27925004", "SCT", "Nodule"), 0.4, True),
    ClassSpec("normal", Code("17621005", "SCT", "Normal"), 0.5, False),
)
TWO = (
    ClassSpec("nodule", Code("27925004", "SCT", "Nodule"), 0.5, True),
    ClassSpec("normal", Code("17621005", "SCT", "Normal"), 0.5, False),
)


def write_package_of(folder: Path, classes: tuple[ClassSpec, ...]) -> Path:
    """An untrained tinycnn (seed 0) whose classifier weights are scaled up, so that its
    probabilities differ from image to image (about 1/3 each, unscaled)."""
    torch.manual_seed(0)
    manifest = Manifest(
        name="three" if len(classes) == 3 else "two",
        version="0.1.0",
        architecture="tinycnn",
        classes=classes,
        input=SPEC,
    )
    weights = build("tinycnn", len(classes)).state_dict()
    weights["classifier.weight"] *= 300
    write_package(folder, manifest, weights)
    return folder


def write_images(root: Path, per_class: dict[str, int]) -> list[tuple[Path, str]]:
    """Noise PNGs in ``test/<class>/``, each class a different brightness."""
    rng = np.random.default_rng(0)
    written = []
    for level, (name, count) in enumerate(per_class.items()):
        (root / "test" / name).mkdir(parents=True)
        for i in range(count):
            image = np.clip(rng.normal(60 + 70 * level, 40, (48, 48)), 0, 255).astype(np.uint8)
            path = root / "test" / name / f"{i}.png"
            cv2.imwrite(str(path), image)
            written.append((path, name))
    return written


def test_multiclass_evaluation_scores_the_findings_the_daemon_reports_present(
    tmp_path: Path,
) -> None:
    package = write_package_of(tmp_path / "package", THREE)
    images = write_images(tmp_path / "data", {"mass": 4, "nodule": 4, "normal": 4})
    out = tmp_path / "report"

    report = evaluate_package(package, tmp_path / "data", out, log=lambda _: None)

    # What the daemon itself says about the same images.
    loaded = load_model(package)
    inputs = [(str(p), to_model_input(read_image01(p), SPEC)) for p, _ in images]
    said = Classifier(loaded).predict(inputs)
    truth = [name for _, name in images]
    for finding in ("mass", "nodule"):
        present = np.array([p.score(finding).positive for p in said])
        real = np.array([name == finding for name in truth])
        tn, fp, fn, tp = skm.confusion_matrix(real, present, labels=[False, True]).ravel()
        assert report["confusion_matrix"][finding] == [[tn, fp], [fn, tp]], finding
        scored = report["per_class"][finding]
        assert scored["sensitivity"] == pytest.approx(tp / (tp + fn)), finding
        assert scored["specificity"] == pytest.approx(tn / (tn + fp)), finding
    nodule = np.array([p.score("nodule").positive for p in said])
    assert 0 < nodule.sum() < len(said), "the test needs nodule both Present and Absent"
    # mass is Present on every image: every mass found, every other image a false alarm.
    assert report["per_class"]["mass"]["sensitivity"] == 1.0
    assert report["per_class"]["mass"]["specificity"] == 0.0
    assert np.isnan(report["per_class"]["mass"]["npv"])  # never Absent
    # "normal" is no finding: the SR never says it is Present or Absent.
    assert report["per_class"]["normal"]["is_finding"] is False
    assert "sensitivity" not in report["per_class"]["normal"]
    assert "normal" not in report["confusion_matrix"]

    # The rule is named, and the argmax figures are kept only under argmax names.
    assert "Present" in report["decision"] and "threshold" in report["decision"]
    assert "accuracy" not in report and "f1_macro" not in report
    most_probable = np.array([int(np.argmax([s.probability for s in p.scores])) for p in said])
    labels = np.array([["mass", "nodule", "normal"].index(name) for name in truth])
    assert report["accuracy_argmax"] == pytest.approx(float((most_probable == labels).mean()))
    assert report["confusion_matrix_argmax"] == skm.confusion_matrix(labels, most_probable).tolist()

    saved = json.loads((out / "evaluation.json").read_text())
    assert saved["per_class"]["mass"]["npv"] is None
    assert saved["sensitivity_macro"] == pytest.approx(
        np.mean([report["per_class"][f]["sensitivity"] for f in ("mass", "nodule")])
    )
    with open(out / "predictions.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["present"] for r in rows] == [
        "|".join(s.name for s in p.scores if s.positive) for p in said
    ]
    markdown = (out / "report.md").read_text()
    assert "Findings as the SR reports them" in markdown and "argmax" in markdown

    # The uncertainty section counts as wrong the images the SR is wrong about (a finding's
    # Present or Absent), not those whose most probable class is.
    sr_wrong = [
        any(p.score(f).positive != (name == f) for f in ("mass", "nodule"))
        for p, name in zip(said, truth, strict=True)
    ]
    assert report["uncertainty"]["errors"] == sum(sr_wrong)


def test_an_image_is_wrong_where_any_finding_the_sr_reports_is() -> None:
    # Most probable class right on every image, and yet the SR wrong on two: a second
    # finding Present beside the true one, and a true finding Absent (under its threshold).
    specs = tuple(
        ClassSpec(name, Code(name, "99TEST", name), 0.5, name != "normal")
        for name in ("mass", "nodule", "normal")
    )
    targets = np.array([0, 1, 2, 0])
    present = np.array(
        [[True, False, False], [False, True, False], [True, True, False], [False, False, False]]
    )
    wrong = reported_wrong(present, targets, specs)
    assert wrong.tolist() == [False, False, True, True]


def test_finding_metrics_are_one_against_the_rest_and_allow_several_or_no_findings() -> None:
    targets = np.array([0, 0, 1, 1, 2, 2])
    present = np.array(
        [[1, 1, 0], [0, 0, 0], [1, 1, 0], [0, 1, 0], [0, 0, 0], [1, 0, 0]], dtype=bool
    )
    found = finding_metrics(present, targets, ("a", "b", "c"), np.array([True, True, False]))
    assert set(found["per_class"]) == {"a", "b"}
    for c, name in enumerate(("a", "b")):
        real, said = targets == c, present[:, c]
        rates = found["per_class"][name]
        assert rates["sensitivity"] == pytest.approx(skm.recall_score(real, said))
        assert rates["ppv"] == pytest.approx(skm.precision_score(real, said))
        assert rates["specificity"] == pytest.approx(skm.recall_score(~real, ~said))
        assert rates["npv"] == pytest.approx(skm.precision_score(~real, ~said))
        assert rates["f1"] == pytest.approx(skm.f1_score(real, said))
        tn, fp, fn, tp = skm.confusion_matrix(real, said).ravel()
        assert rates["confusion"] == [[tn, fp], [fn, tp]]
    assert found["sensitivity_macro"] == pytest.approx((0.5 + 1.0) / 2)


def test_evaluate_on_one_class_says_why_there_is_no_auc(tmp_path: Path) -> None:
    package = write_package_of(tmp_path / "package", TWO)
    write_images(tmp_path / "data", {"normal": 3})
    said: list[str] = []

    report = evaluate_package(package, tmp_path / "data", tmp_path / "report", log=said.append)

    assert np.isnan(report["auc_macro"])
    line = said[-1]
    assert "nan" not in line.lower(), line
    assert "AUC n/a (every image is normal" in line, line
