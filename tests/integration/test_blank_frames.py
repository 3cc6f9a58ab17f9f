"""A blank frame (a dark lead-in or padding frame of an XA run or a cine) of a multi-frame image
read with ``frames = "all"`` is left out, and the image is reported by its other frames: one
such frame had made the whole image "not evaluated", and a finding on the others went
unreported. An image of blank frames only, or a blank image read by its first frame, is still
not evaluated."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from sqlalchemy import select
from test_all_frames import MULTI_FRAME_WORD_SC, reported_frames, world_of_all_frames
from test_job_runner import ingest

from dicomai.db.models import Prediction
from dicomai.imaging.preprocess import prepare
from dicomai.imaging.spec import InputSpec
from dicomai.jobs.assembler import complete_quiet_studies
from dicomai.jobs.reading import read_image, with_frame
from dicomai.jobs.runner import JobRunner
from dicomai.training.synthetic import write_dicom_images

ALL_FRAMES = InputSpec(size=(64, 64), frames="all")


def multi_frame(folder: Path, kinds: list[str]) -> pydicom.Dataset:
    """A multi-frame image of synthetic chests, one frame per kind: "clear", "nodule" or
    "blank" (every pixel 0)."""
    written = write_dicom_images(folder, 10, seed=21, size=128)
    clear = iter([pydicom.dcmread(w.path) for w in written if w.label == 0])
    nodule = pydicom.dcmread(next(w for w in written if w.label == 1).path)
    frames = {"clear": lambda: next(clear).PixelData, "nodule": lambda: nodule.PixelData}
    ds = nodule
    pixels = [frames[k]() if k in frames else bytes(len(nodule.PixelData)) for k in kinds]
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MULTI_FRAME_WORD_SC
    ds.NumberOfFrames = len(kinds)
    ds.FrameIncrementPointer = 0x00181063  # Frame Time
    ds.FrameTime = 100
    ds.PixelData = b"".join(pixels)
    return ds


def saved(ds: pydicom.Dataset, folder: Path) -> Path:
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_a_blank_lead_in_frame_is_left_out_and_the_nodule_frame_reported(tmp_path: Path) -> None:
    settings, sessions = world_of_all_frames(tmp_path)
    ds = multi_frame(tmp_path / "frames", ["blank", "clear", "clear", "nodule"])

    ingest(settings, sessions, ds, tmp_path)
    (job_id,) = complete_quiet_studies(sessions, 0)
    JobRunner(settings, sessions, device="cpu").run_job(job_id)

    with sessions() as session:
        (prediction,) = session.scalars(select(Prediction).where(Prediction.job_id == job_id))
        assert prediction.evaluated, f"a blank lead-in frame failed the image: {prediction.reason}"
        assert prediction.positive, "the nodule on frame 4 was not reported"
    assert reported_frames(tmp_path / "delivered") == {"SR": {4}, "OT": {4}}


def test_the_frame_reported_is_numbered_with_the_blank_frames_counted(tmp_path: Path) -> None:
    ds = multi_frame(tmp_path, ["clear", "blank", "nodule", "blank"])

    image = read_image(ds.SOPInstanceUID, saved(ds, tmp_path), ALL_FRAMES)

    assert image.reason is None and len(image.frames) == 2
    chosen = with_frame(image, 1, ALL_FRAMES)
    assert chosen.source is not None and chosen.source.frame == 2
    assert np.array_equal(chosen.tensor, prepare(ds, ALL_FRAMES, 2)[1])
    assert np.array_equal(chosen.source.display, prepare(ds, ALL_FRAMES, 2)[0])


def test_an_image_left_with_one_frame_is_reported_by_that_frame(tmp_path: Path) -> None:
    ds = multi_frame(tmp_path, ["blank", "blank", "nodule"])

    image = read_image(ds.SOPInstanceUID, saved(ds, tmp_path), ALL_FRAMES)

    assert image.reason is None and image.source is not None
    assert image.source.frame == 2
    assert np.array_equal(image.tensor, prepare(ds, ALL_FRAMES, 2)[1])


def test_an_image_of_blank_frames_only_is_not_evaluated(tmp_path: Path) -> None:
    ds = multi_frame(tmp_path, ["blank", "blank", "blank"])

    image = read_image(ds.SOPInstanceUID, saved(ds, tmp_path), ALL_FRAMES)

    assert image.tensor is None and image.source is not None, "the SR must name it"
    assert image.reason is not None and image.reason.startswith("image is blank"), image.reason


def test_a_blank_image_read_by_its_first_frame_is_still_not_evaluated(tmp_path: Path) -> None:
    many = multi_frame(tmp_path / "many", ["blank", "nodule"])
    one = multi_frame(tmp_path / "one", ["blank"])
    del one.NumberOfFrames, one.FrameIncrementPointer, one.FrameTime

    first = read_image(many.SOPInstanceUID, saved(many, tmp_path), InputSpec(size=(64, 64)))
    single = read_image(one.SOPInstanceUID, saved(one, tmp_path), ALL_FRAMES)

    for image, reason in ((first, "frame 1 is blank"), (single, "image is blank")):
        assert image.tensor is None and image.reason is not None
        assert image.reason.startswith(reason), image.reason
