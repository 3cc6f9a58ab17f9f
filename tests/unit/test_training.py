"""Training on synthetic images: the data, the loop, calibration and where Grad-CAM points."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import torch
from torch import nn

from dicomai.explain import gradcam
from dicomai.explain.pointing import pointing_hits
from dicomai.imaging.preprocess import render
from dicomai.imaging.spec import InputSpec
from dicomai.training.synthetic import (
    DX_FOR_PRESENTATION,
    SyntheticImages,
    synthesize,
    write_dicom_images,
)
from dicomai.training.trainer import (
    Split,
    fit_temperature,
    model_inputs,
    roc_auc,
    stratified_split,
    train_classifier,
)

SIZE = 64
SPEC = InputSpec(size=(SIZE, SIZE), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


@dataclass
class Trained:
    data: SyntheticImages
    split: Split
    model: nn.Module
    metrics: dict[str, Any]


@pytest.fixture(scope="module")
def trained() -> Trained:
    """tinycnn trained once for this module: 640 images of 64², 10 epochs (~10 s on 2 cores)."""
    data = synthesize(640, size=SIZE, seed=0)
    model, metrics = train_classifier(
        "tinycnn", data.images, data.labels, SPEC, epochs=10, lr=3e-3, seed=0, log=lambda _: None
    )
    return Trained(data, stratified_split(data.labels, 0.2, 0), model, metrics)


def test_tinycnn_learns_nodules_to_90_percent_validation_accuracy(trained: Trained) -> None:
    metrics = trained.metrics
    assert metrics["val_accuracy"] >= 0.90, metrics
    assert metrics["n_val"] == len(trained.split.val) == 128
    assert 0.05 <= metrics["temperature"] <= 20.0
    assert metrics["val_nll_calibrated"] <= metrics["val_nll"] + 1e-9


def test_gradcam_points_into_the_painted_lesion(trained: Trained) -> None:
    data, val = trained.data, trained.split.val
    positives = val[data.labels[val] == 1]
    maps = gradcam(trained.model, model_inputs(data.images[positives], SPEC), [1] * len(positives))
    # The pointing game's usual tolerance, 15 pixels at 224² (Zhang et al., ECCV 2016), scaled.
    margin = 15.0 * SIZE / 224
    hits = pointing_hits(maps, data.centres[positives], data.radii[positives], margin)
    assert np.mean(hits) >= 0.80, f"pointing game {np.mean(hits):.2f} on {len(hits)} images"


def test_training_is_deterministic_for_a_seed() -> None:
    data = synthesize(48, size=32, seed=5)
    spec = InputSpec(size=(32, 32))
    runs = [
        train_classifier(
            "tinycnn",
            data.images,
            data.labels,
            spec,
            epochs=1,
            seed=7,
            batch_size=16,
            log=lambda _: None,
        )
        for _ in range(2)
    ]
    (first, _), (second, _) = runs
    for key, value in first.state_dict().items():
        assert torch.equal(value, second.state_dict()[key]), key


def test_training_prints_a_line_per_epoch() -> None:
    data = synthesize(24, size=32, seed=5)
    lines: list[str] = []
    train_classifier(
        "tinycnn", data.images, data.labels, InputSpec(size=(32, 32)), epochs=2, log=lines.append
    )
    assert len(lines) == 2
    assert lines[1].startswith("epoch 2/2") and "val accuracy" in lines[1]


def test_synthetic_images_are_seeded_and_nodules_sit_in_their_masks() -> None:
    first, again, other = synthesize(20, seed=3), synthesize(20, seed=3), synthesize(20, seed=4)
    assert np.array_equal(first.images, again.images)
    assert not np.array_equal(first.images, other.images)
    assert first.images.dtype == np.float32 and 0 <= first.images.min() <= first.images.max() <= 1
    for i in range(20):
        if first.labels[i]:
            row, col = first.centres[i].astype(int)
            assert first.masks[i, row, col]
            assert first.masks[i].sum() == pytest.approx(np.pi * first.radii[i] ** 2, rel=0.25)
        else:
            assert not first.masks[i].any() and np.isnan(first.centres[i]).all()


def test_stratified_split_holds_out_each_class() -> None:
    labels = np.array([0] * 30 + [1] * 10)
    split = stratified_split(labels, 0.2, seed=1)
    assert np.array_equal(np.sort(np.concatenate([split.train, split.val])), np.arange(40))
    assert (labels[split.val] == 0).sum() == 6 and (labels[split.val] == 1).sum() == 2


def test_fitted_temperature_recovers_the_true_one() -> None:
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(4000, 3, generator=generator, dtype=torch.float64) * 3
    targets = torch.multinomial(torch.softmax(logits / 2.5, dim=1), 1, generator=generator)[:, 0]
    assert fit_temperature(logits, targets) == pytest.approx(2.5, rel=0.1)


def test_roc_auc_counts_ties_as_half() -> None:
    assert roc_auc(np.array([0.1, 0.4, 0.35, 0.8]), np.array([0, 0, 1, 1])) == 0.75
    assert roc_auc(np.array([0.5, 0.5]), np.array([0, 1])) == 0.5


def test_synthetic_dicom_files_are_monochrome2_dx_of_the_demo_patient(tmp_path: Path) -> None:
    written = write_dicom_images(tmp_path, 3, seed=2, size=96, bits=16, positive_fraction=1.0)
    again = write_dicom_images(tmp_path / "again", 3, seed=2, size=96, bits=16)
    assert [w.sop_instance_uid for w in written] == [w.sop_instance_uid for w in again]
    assert len({w.study_uid for w in written}) == 3
    ds = pydicom.dcmread(written[0].path)
    assert ds.SOPClassUID == DX_FOR_PRESENTATION
    assert ds.PhotometricInterpretation == "MONOCHROME2" and ds.BitsStored == 12
    assert str(ds.PatientName) == "Demo^Patient"
    expected = synthesize(3, size=96, seed=2, positive_fraction=1.0).images[0]
    assert np.abs(render(ds) - expected).max() < 2e-3
    assert written[0].label == 1 and written[0].centre is not None


def test_cr_images_can_be_eight_bit(tmp_path: Path) -> None:
    (image,) = write_dicom_images(tmp_path, 1, modality="CR", bits=8, size=64)
    ds = pydicom.dcmread(image.path)
    assert ds.Modality == "CR" and ds.BitsAllocated == 8
    assert ds.pixel_array.dtype == np.uint8
