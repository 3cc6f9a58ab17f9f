"""`color = "rgb"`: a model whose finding is in colour (seed 002: DermaMNIST, PathMNIST) sees it."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from test_train_cli import FAST, SIZE, run

from dicomai.imaging.preprocess import prepare, to_model_input
from dicomai.imaging.spec import InputSpec
from dicomai.models.package import load_model

VL_PHOTOGRAPHIC = "1.2.840.10008.5.1.4.1.1.77.1.4"
# Two lesion colours of one luminance (ITU-R BT.601, as the grey mode computes it): only a
# model that sees colour can tell them apart.
RED = np.array([0.9, 0.2, 0.2])
GREEN = np.array([0.2, 0.5564, 0.2])
MID_GREY = {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}


def lesion_images(n: int, seed: int) -> list[tuple[np.ndarray, str]]:
    """Skin-like RGB images, each with one round lesion, red ("melanoma") or green ("naevus"),
    of a random brightness, place and size: its luminance says nothing of its class."""
    rng = np.random.default_rng(seed)
    images = []
    for i in range(n):
        label = "melanoma" if i % 2 == 0 else "naevus"
        image = np.full((SIZE, SIZE, 3), 0.55) + rng.normal(0, 0.03, (SIZE, SIZE, 1))
        colour = (RED if label == "melanoma" else GREEN) * rng.uniform(0.7, 1.1)
        rows, cols = np.ogrid[:SIZE, :SIZE]
        (r, c), radius = rng.integers(16, SIZE - 16, 2), int(rng.integers(7, 12))
        image[(rows - r) ** 2 + (cols - c) ** 2 <= radius**2] = colour
        images.append((np.clip(image, 0, 1), label))
    return images


def write_pngs(root: Path, split: str, n: int, seed: int) -> None:
    for i, (image, label) in enumerate(lesion_images(n, seed)):
        path = root / split / label / f"{split}-{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        bgr = np.rint(image[..., ::-1] * 255).astype(np.uint8)
        cv2.imwrite(str(path), bgr)


def rgb_dicom(image: np.ndarray) -> pydicom.Dataset:
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = VL_PHOTOGRAPHIC
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "XC"
    ds.Rows, ds.Columns = image.shape[:2]
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.rint(image * 255).astype(np.uint8).tobytes()
    return ds


def write_dicoms(root: Path, n: int, seed: int) -> Path:
    """The same kind of images as DICOM files (what the daemon reads), with a labels CSV."""
    root.mkdir(parents=True)
    with open(root / "labels.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "label"])
        for i, (image, label) in enumerate(lesion_images(n, seed)):
            rgb_dicom(image).save_as(root / f"{i:03d}.dcm", enforce_file_format=True)
            writer.writerow([f"{i:03d}.dcm", label])
    return root / "labels.csv"


def test_a_colour_model_gets_the_three_channels_and_a_grey_one_the_luminance() -> None:
    ds = pydicom.dcmread(get_testdata_file("SC_rgb_rle.dcm"))
    rgb = ds.pixel_array.astype(np.float32) / 255
    spec = InputSpec(size=(ds.Rows, ds.Columns), **MID_GREY)
    _, colour = prepare(ds, InputSpec(size=spec.size, color="rgb", **MID_GREY))
    np.testing.assert_allclose(colour * 0.25 + 0.5, rgb.transpose(2, 0, 1), atol=1e-6)
    display, grey = prepare(ds, spec)
    luma = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    for channel in grey:
        np.testing.assert_allclose(channel * 0.25 + 0.5, luma, atol=1e-5)
    # The overlay is drawn on the grey image whatever the model sees.
    np.testing.assert_array_equal(display, prepare(ds, InputSpec(color="rgb"))[0])


def test_a_palette_image_reaches_a_colour_model_in_its_colours() -> None:
    ds = pydicom.dcmread(get_testdata_file("examples_palette.dcm"))
    _, tensor = prepare(ds, InputSpec(size=(ds.Rows, ds.Columns), color="rgb", **MID_GREY))
    assert not np.allclose(tensor[0], tensor[1]) and not np.allclose(tensor[1], tensor[2])


@pytest.mark.parametrize("equalize", ["hist", "clahe"])
def test_equalising_a_colour_image_keeps_its_hues(equalize: str) -> None:
    image = np.full((64, 64, 3), 0.3, np.float32)
    image[:32] = RED * 0.5
    image[32:] = GREEN * 0.5
    spec = InputSpec(size=(64, 64), color="rgb", equalize=equalize, mean=(0, 0, 0), std=(1, 1, 1))
    out = to_model_input(image, spec)
    red, green = out[:, 8, 32], out[:, 56, 32]
    assert red[0] > red[1] and red[0] > red[2], red
    assert green[1] > green[0] and green[1] > green[2], green


@pytest.fixture(scope="module")
def lesions(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("lesions")
    write_pngs(root, "train", 160, seed=0)
    return root, write_dicoms(root / "dicom", 40, seed=1)


def accuracy_on_dicom(lesions: tuple[Path, Path], color: str, tmp_path: Path) -> float:
    pngs, labels = lesions
    out = tmp_path / color
    code, output = run("train", "--data", str(pngs), "--out", str(out), "--name", "lesion",
                       "--color", color, *FAST, "--epochs", "10")  # fmt: skip
    assert code == 0, output
    assert load_model(out / "package").manifest.input.color == color
    report = tmp_path / f"{color}-report"
    code, output = run("evaluate", str(out / "package"), "--data", str(labels.parent),
                       "--labels", str(labels), "--out", str(report))  # fmt: skip
    assert code == 0, output
    return json.loads((report / "evaluation.json").read_text())["accuracy"]


def test_only_a_model_trained_in_colour_tells_lesions_of_one_brightness_apart(
    lesions: tuple[Path, Path], tmp_path: Path
) -> None:
    # Trained on PNGs, evaluated on RGB DICOM files through the daemon's `prepare`.
    assert accuracy_on_dicom(lesions, "rgb", tmp_path) >= 0.9
    assert accuracy_on_dicom(lesions, "grey", tmp_path) <= 0.75
