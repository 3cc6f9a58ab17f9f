"""Calibration and uncertainty: temperature scaling, MC dropout, deep ensembles through packages."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from dicomai.errors import ModelPackageError
from dicomai.evaluation.metrics import calibration
from dicomai.imaging.preprocess import to_model_input
from dicomai.imaging.spec import InputSpec
from dicomai.inference.runner import Classifier
from dicomai.inference.types import Code
from dicomai.inference.uncertainty import (
    fit_temperature,
    mc_dropout_probabilities,
    summarize,
    tempered_probabilities,
)
from dicomai.models.architectures import build
from dicomai.models.package import (
    ClassSpec,
    LoadedModel,
    Manifest,
    UncertaintySpec,
    load_model,
    read_manifest,
    verify_weights,
    write_ensemble_package,
    write_package,
)
from dicomai.training.datasets import Task
from dicomai.training.synthetic import synthesize

SPEC = InputSpec(size=(32, 32))
CLASSES = (
    ClassSpec("normal", Code("17621005", "SCT", "Normal"), 0.5, False),
    ClassSpec("nodule", Code("27925004", "SCT", "Nodule"), 0.5, True),
)


def manifest(**changes: object) -> Manifest:
    base = Manifest(
        name="unsure", version="1.0.0", architecture="tinycnn", classes=CLASSES, input=SPEC
    )
    return dataclasses.replace(base, **changes)


def images(n: int) -> list[tuple[str, np.ndarray]]:
    data = synthesize(n, size=32, seed=3).images
    return [(f"1.2.{i}", to_model_input(image, SPEC)) for i, image in enumerate(data)]


def seeded(seed: int, dropout: float = 0.5) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build("tinycnn", 2, dropout=dropout).eval()


def ece(probabilities: np.ndarray, targets: np.ndarray) -> float:
    """The ECE that `dicomai evaluate` and the package's metrics report (10 bins)."""
    return float(calibration(probabilities, targets, Task.MULTICLASS)["ece"])


def test_temperature_scaling_lowers_the_ece_of_an_overconfident_model() -> None:
    generator = torch.Generator().manual_seed(0)
    honest = torch.randn(3000, 4, generator=generator, dtype=torch.float64) * 1.5
    targets = torch.multinomial(torch.softmax(honest, dim=1), 1, generator=generator)[:, 0]
    overconfident = honest * 4.0  # what an over-trained network's logits look like
    val, test = slice(0, 1500), slice(1500, None)
    temperature = fit_temperature(overconfident[val], targets[val])
    truth = targets[test].numpy()
    before = ece(tempered_probabilities(overconfident[test], 1.0), truth)
    after = ece(tempered_probabilities(overconfident[test], temperature), truth)
    assert temperature == pytest.approx(4.0, rel=0.15)
    assert before > 0.1 and after < before / 3, (before, after)


def test_mc_dropout_varies_repeats_under_its_seed_and_leaves_batchnorm_alone() -> None:
    model = seeded(0)
    batch = torch.from_numpy(np.stack([x for _, x in images(4)]))
    stats = model.features[0][1].running_mean.clone()
    first = mc_dropout_probabilities(model, batch, passes=8, seed=11)
    again = mc_dropout_probabilities(model, batch, passes=8, seed=11)
    other = mc_dropout_probabilities(model, batch, passes=8, seed=12)
    assert first.shape == (8, 4, 2)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)
    summary = summarize(first)
    assert (summary.std > 0).all() and (summary.mutual_information >= 0).all()
    np.testing.assert_allclose(summary.mean.sum(axis=1), 1.0)
    assert torch.equal(model.features[0][1].running_mean, stats) and not model.training


def test_an_images_mc_dropout_numbers_do_not_depend_on_its_batch() -> None:
    # Masks drawn across the batch: the same borderline image was 0.41 in one batch and 0.51
    # in another, Absent in one study and Present in the next.
    model = seeded(0)
    batch = torch.from_numpy(np.stack([x for _, x in images(5)]))
    together = mc_dropout_probabilities(model, batch, passes=8, seed=11)
    reversed_order = mc_dropout_probabilities(model, batch.flip(0), passes=8, seed=11)
    alone = mc_dropout_probabilities(model, batch[2:3], passes=8, seed=11)
    np.testing.assert_allclose(together, reversed_order[:, ::-1], atol=1e-6)
    np.testing.assert_allclose(together[:, 2:3], alone, atol=1e-6)


def test_classifier_reports_mc_dropout_spread_per_class_and_image(tmp_path: Path) -> None:
    spec = UncertaintySpec(method="mc_dropout", passes=6, seed=5)
    write_package(
        tmp_path, manifest(options={"dropout": 0.5}, uncertainty=spec), seeded(0).state_dict()
    )
    loaded = load_model(tmp_path)
    assert loaded.manifest.uncertainty == spec
    first = Classifier(loaded).predict(images(3))
    again = Classifier(loaded).predict(images(3))
    for a, b in zip(first, again, strict=True):
        assert a.uncertainty is not None and a.uncertainty > 0
        assert a.uncertainty == a.score("nodule").uncertainty == b.uncertainty
        assert a.uncertainty_estimate is not None and a.uncertainty_estimate.samples == 6
        assert a.uncertainty_estimate.method == "mc_dropout"
        assert sum(s.probability for s in a.scores) == pytest.approx(1.0)


def test_mc_dropout_of_a_network_without_dropout_is_a_package_error() -> None:
    spec = UncertaintySpec(method="mc_dropout")
    loaded = LoadedModel(manifest(options={"dropout": 0.0}, uncertainty=spec), seeded(0, 0.0))
    with pytest.raises(ModelPackageError, match="mc_dropout needs dropout"):
        Classifier(loaded)


def test_an_ensemble_of_two_averages_its_members(tmp_path: Path) -> None:
    members = [seeded(1), seeded(2)]
    written = write_ensemble_package(tmp_path, manifest(), [m.state_dict() for m in members])
    assert written.uncertainty.method == "ensemble" and len(written.ensemble) == 1
    verify_weights(tmp_path, read_manifest(tmp_path))
    loaded = load_model(tmp_path)
    assert len(loaded.members) == 2
    inputs = images(3)
    predictions = Classifier(loaded).predict(inputs)
    batch = torch.from_numpy(np.stack([x for _, x in inputs]))
    with torch.inference_mode():
        each = [torch.softmax(m(batch).double(), dim=1).numpy() for m in members]
    for i, prediction in enumerate(predictions):
        got = [s.probability for s in prediction.scores]
        np.testing.assert_allclose(got, (each[0][i] + each[1][i]) / 2, rtol=1e-5)
        spread = abs(each[0][i][1] - each[1][i][1]) / 2
        assert prediction.score("nodule").uncertainty == pytest.approx(spread, rel=1e-4)
        assert prediction.heatmap is not None and prediction.heatmap.max() <= 1.0


@pytest.mark.parametrize("method", ["mc_dropout", "ensemble"])
def test_evaluation_scores_the_package_as_the_daemon_does(tmp_path: Path, method: str) -> None:
    # `dicomai evaluate` reads Classifier.probabilities: with an uncertainty method it must be
    # the mean over the passes that `predict` reports, not one plain pass.
    if method == "ensemble":
        write_ensemble_package(
            tmp_path, manifest(), [seeded(1).state_dict(), seeded(2).state_dict()]
        )
    else:
        spec = UncertaintySpec(method="mc_dropout", passes=6, seed=5)
        write_package(
            tmp_path, manifest(options={"dropout": 0.5}, uncertainty=spec), seeded(0).state_dict()
        )
    classifier = Classifier(load_model(tmp_path))
    inputs = images(3)
    batch = torch.from_numpy(np.stack([x for _, x in inputs]))

    scored = classifier.probabilities(batch)
    with torch.inference_mode():
        single = torch.softmax(classifier.module(batch).double(), dim=1).numpy()

    predicted = [[s.probability for s in p.scores] for p in classifier.predict(inputs)]
    np.testing.assert_allclose(scored, predicted, rtol=1e-5)
    assert not np.allclose(scored, single, rtol=1e-3), "scored by one plain pass"


def test_a_tampered_member_fails_the_digest_check(tmp_path: Path) -> None:
    write_ensemble_package(tmp_path, manifest(), [seeded(1).state_dict(), seeded(2).state_dict()])
    (tmp_path / "member1.safetensors").write_bytes(b"not the weights")
    with pytest.raises(ModelPackageError, match=r"member1\.safetensors"):
        load_model(tmp_path)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('[uncertainty]\nmethod = "bayes"\n', "uncertainty.method"),
        ('[uncertainty]\nmethod = "mc_dropout"\npasses = 1\n', "uncertainty.passes"),
        ('[uncertainty]\nmethod = "ensemble"\n', "ensemble.members"),
    ],
)
def test_bad_uncertainty_tables_are_one_line_errors(tmp_path: Path, table: str, message: str):
    write_package(tmp_path, manifest(), seeded(0).state_dict())
    path = tmp_path / "model.toml"
    text = path.read_text()
    start = text.index("[uncertainty]")
    end = text.index("\n\n", start) + 1 if "\n\n" in text[start:] else len(text)
    path.write_text(text[:start] + table + text[end:])
    with pytest.raises(ModelPackageError, match=message):
        read_manifest(tmp_path)
