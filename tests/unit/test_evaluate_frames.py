"""`dicomai evaluate` scores a multi-frame image as the daemon reports it: with ``frames = "all"``
by the frame whose finding is most probable (it had read the first frame only, whatever the
package said), with ``frames = "first"`` by its first frame."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from test_evaluate_not_evaluated import write_noise_pngs, write_tiny_package

from dicomai.evaluation.report import evaluate_package
from dicomai.imaging.spec import InputSpec
from dicomai.inference.runner import Classifier
from dicomai.jobs.reading import read_image
from dicomai.models.package import load_model

SPEC = InputSpec(size=(32, 32))


def write_frames(path: Path, frames: np.ndarray) -> Path:
    """A multi-frame secondary capture of `frames` (frames, rows, cols), 8 bits."""
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7.2"  # Multi-frame Grayscale Byte SC
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.Modality = "OT"
    ds.NumberOfFrames = len(frames)
    ds.Rows, ds.Columns = frames.shape[1:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = frames.astype(np.uint8).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def nodule_probability(package: Path, frames: np.ndarray) -> np.ndarray:
    """The package's nodule probability for each frame on its own, as single-frame images."""
    loaded = load_model(package)
    tensors = []
    for index, frame in enumerate(frames):
        path = write_frames(package.parent / f"frame{index}.dcm", frame[None])
        tensors.append(read_image(str(index), path, loaded.manifest.input).tensor)
    classifier = Classifier(loaded)
    return classifier.summary(torch.from_numpy(np.stack(tensors))).mean[:, 0]


def probability_in_report(report: Path, name: str) -> float:
    with open(report / "predictions.csv", newline="") as handle:
        (row,) = [row for row in csv.DictReader(handle) if row["file"].endswith(name)]
    return float(row["nodule"])


@pytest.mark.parametrize("frames", ["all", "first"])
def test_a_multi_frame_image_is_scored_by_the_frame_the_daemon_reports(
    frames: str, tmp_path: Path
) -> None:
    package = write_tiny_package(tmp_path / "package", InputSpec(size=(32, 32), frames=frames))
    rng = np.random.default_rng(1)
    stack = np.stack([np.clip(rng.normal(mean, 30, (48, 48)), 0, 255) for mean in (40, 130, 220)])
    per_frame = nodule_probability(package, stack)
    # Frame 1 must not be the most probable, or reading frame 1 only would pass too.
    stack = stack[np.argsort(per_frame)]
    per_frame = np.sort(per_frame)
    assert per_frame[-1] - per_frame[0] > 1e-4, per_frame
    write_noise_pngs(tmp_path / "data", per_class=2)
    write_frames(tmp_path / "data" / "test" / "nodule" / "run.dcm", stack)

    report = evaluate_package(package, tmp_path / "data", tmp_path / "report", log=print)

    assert report["data"]["n"] == 5
    expected = per_frame[-1] if frames == "all" else per_frame[0]
    assert probability_in_report(tmp_path / "report", "run.dcm") == pytest.approx(
        expected, abs=1e-4
    )
