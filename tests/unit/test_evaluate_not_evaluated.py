"""`dicomai evaluate` leaves out, and names, the images the daemon would not evaluate (one blank
DICOM image of a test set had stopped the whole evaluation), and shows a colour model's
misclassified images in colour (the figure showed their red plane only)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
import torch
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from test_train_cli import run

from dicomai.errors import DatasetError
from dicomai.evaluation.report import evaluate_package
from dicomai.imaging.spec import InputSpec
from dicomai.inference.types import Code
from dicomai.models.architectures import build
from dicomai.models.package import ClassSpec, Manifest, write_package

TWO = (
    ClassSpec("nodule", Code("27925004", "SCT", "Nodule"), 0.5, True),
    ClassSpec("normal", Code("17621005", "SCT", "Normal"), 0.5, False),
)


def write_tiny_package(folder: Path, spec: InputSpec) -> Path:
    """An untrained tinycnn (seed 0): its answers need not be right, only the daemon's."""
    torch.manual_seed(0)
    manifest = Manifest(
        name="two", version="0.1.0", architecture="tinycnn", classes=TWO, input=spec
    )
    write_package(folder, manifest, build("tinycnn", 2).state_dict())
    return folder


def write_noise_pngs(root: Path, per_class: int) -> None:
    rng = np.random.default_rng(0)
    for level, name in enumerate(("nodule", "normal")):
        (root / "test" / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            image = np.clip(rng.normal(60 + 70 * level, 40, (48, 48)), 0, 255).astype(np.uint8)
            cv2.imwrite(str(root / "test" / name / f"{i}.png"), image)


def write_blank_dicom(path: Path) -> Path:
    """A uniform radiograph, as a failed exposure gives."""
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.Modality = "DX"
    ds.Rows = ds.Columns = 64
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.full((64, 64), 700, np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_images_the_daemon_would_not_evaluate_are_left_out_and_listed(tmp_path: Path) -> None:
    package = write_tiny_package(tmp_path / "package", InputSpec(size=(32, 32)))
    write_noise_pngs(tmp_path / "clean", per_class=4)
    data = tmp_path / "data"
    shutil.copytree(tmp_path / "clean", data)
    blank = write_blank_dicom(data / "test" / "normal" / "failed-exposure.dcm")
    icon = data / "test" / "nodule" / "icon.png"
    cv2.imwrite(str(icon), np.arange(4, dtype=np.uint8).reshape(2, 2) * 60)
    lines: list[str] = []

    report = evaluate_package(package, data, tmp_path / "report", log=lines.append)

    reasons = {item["file"]: item["reason"] for item in report["data"]["not_evaluated"]}
    assert reasons.keys() == {str(blank), str(icon)}
    assert reasons[str(blank)].startswith("image is blank")
    assert reasons[str(icon)].startswith("image too small for the model")
    assert report["data"]["n"] == 8 and report["data"]["n_not_evaluated"] == 2
    assert sum(str(blank) in line and "not evaluated" in line for line in lines) == 1
    assert sum(str(icon) in line and "not evaluated" in line for line in lines) == 1
    # The numbers are those of the images the daemon evaluates, as if the others were absent.
    clean = evaluate_package(package, tmp_path / "clean", tmp_path / "clean-report", log=print)
    for key in ("accuracy", "auc_macro", "brier", "confusion_matrix"):
        assert report[key] == clean[key], key
    saved = json.loads((tmp_path / "report" / "evaluation.json").read_text())
    assert saved["data"]["n_not_evaluated"] == 2
    assert {item["file"] for item in saved["data"]["not_evaluated"]} == {str(blank), str(icon)}
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "2 more left out" in markdown and "## Not evaluated" in markdown
    assert str(blank) in markdown and "image is blank" in markdown
    predicted = (tmp_path / "report" / "predictions.csv").read_text()
    assert "failed-exposure" not in predicted and "icon" not in predicted


def test_a_file_that_is_not_dicom_still_stops_the_evaluation(tmp_path: Path) -> None:
    package = write_tiny_package(tmp_path / "package", InputSpec(size=(32, 32)))
    write_noise_pngs(tmp_path / "data", per_class=2)
    broken = tmp_path / "data" / "test" / "normal" / "broken.dcm"
    broken.write_bytes(b"this is a text file named .dcm")

    with pytest.raises(DatasetError, match=r"broken\.dcm: unreadable DICOM image: not a DICOM"):
        evaluate_package(package, tmp_path / "data", tmp_path / "report", log=print)


def test_a_set_the_daemon_would_evaluate_none_of_fails_in_one_line(tmp_path: Path) -> None:
    package = write_tiny_package(tmp_path / "package", InputSpec(size=(32, 32)))
    for name in ("nodule", "normal"):
        (tmp_path / "data" / name).mkdir(parents=True)
        write_blank_dicom(tmp_path / "data" / name / "blank.dcm")

    code, output = run("evaluate", str(package), "--data", str(tmp_path / "data"),
                       "--out", str(tmp_path / "report"))  # fmt: skip

    assert code != 0
    error = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "none of its 2 images" in error[0], output
    assert "image is blank" in error[0], output
    assert not (tmp_path / "report" / "evaluation.json").exists()


def test_a_colour_model_s_misclassified_images_are_shown_in_colour(tmp_path: Path) -> None:
    spec = InputSpec(size=(32, 32), color="rgb")
    package = write_tiny_package(tmp_path / "package", spec)
    rng = np.random.default_rng(0)
    for name in ("nodule", "normal"):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(3):
            # Blue lesions with a texture (not blank), and no red: the red plane is black.
            blue = rng.integers(180, 256, (48, 48), dtype=np.uint8)
            bgr = np.stack([blue, np.zeros_like(blue), np.zeros_like(blue)], axis=-1)
            cv2.imwrite(str(tmp_path / "data" / name / f"{i}.png"), bgr)

    report = evaluate_package(package, tmp_path / "data", tmp_path / "report", log=print)

    assert report["data"]["n"] == 6
    figure = cv2.imread(str(tmp_path / "report" / "misclassified.png"))[..., ::-1] / 255.0
    blue_pixels = (figure[..., 2] > 0.6) & (figure[..., 0] < 0.4)
    # Each tile is about 280 px square; the heat map blends in at 35 %.
    assert blue_pixels.sum() > 10_000, "the misclassified images are not shown in blue"
