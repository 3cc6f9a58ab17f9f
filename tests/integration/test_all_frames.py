"""A package with ``frames = "all"``: every frame of a multi-frame image is classified, and the
image is reported by the frame with the finding (it was refused: the worker read frame 1 only)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import torch
from daemon import REPO
from servers import dciodvfy
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from test_job_runner import ingest, make_world

from dicomai.audit import Operator, os_user
from dicomai.config import Settings
from dicomai.db.models import Prediction
from dicomai.imaging.preprocess import prepare
from dicomai.inference.runner import Classifier
from dicomai.jobs.assembler import complete_quiet_studies
from dicomai.jobs.runner import JobRunner
from dicomai.models.package import load_model
from dicomai.rollout.deployment import activate
from dicomai.rollout.registry import register
from dicomai.training.synthetic import write_dicom_images

MULTI_FRAME_WORD_SC = "1.2.840.10008.5.1.4.1.1.7.3"
SINGLE_FRAME_SC = "1.2.840.10008.5.1.4.1.1.7"
NODULE_FRAME = 3


def three_frames(folder: Path) -> pydicom.Dataset:
    """A three-frame image of synthetic chests: clear, clear, then one with a nodule."""
    written = write_dicom_images(folder, 10, seed=21, size=128)
    clear = [w for w in written if w.label == 0][:2]
    nodule = next(w for w in written if w.label == 1)
    frames = [pydicom.dcmread(w.path) for w in (*clear, nodule)]
    ds = frames[0]
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MULTI_FRAME_WORD_SC
    ds.NumberOfFrames = len(frames)
    ds.FrameIncrementPointer = 0x00181063  # Frame Time
    ds.FrameTime = 100
    ds.PixelData = b"".join(f.PixelData for f in frames)
    return ds


def package_of_all_frames(folder: Path) -> Path:
    package = folder / "all-frames"
    shutil.copytree(REPO / "models" / "demo-chest-nodule", package)
    manifest = package / "model.toml"
    text = manifest.read_text().replace('frames = "first"', 'frames = "all"')
    manifest.write_text(text.replace('version = "1.0.0"', 'version = "1.1.0"', 1))
    return package


def reported_frames(folder: Path) -> dict[str, set[int]]:
    """The frame numbers each delivered object references, by modality."""
    found: dict[str, set[int]] = {}
    for path in folder.iterdir():
        ds = pydicom.dcmread(path)
        assert dciodvfy(path).ok, dciodvfy(path).errors
        frames = found.setdefault(str(ds.Modality), set())
        _collect_frames(ds, frames)
    return found


def _collect_frames(item: pydicom.Dataset, found: set[int]) -> None:
    for element in item:
        if element.keyword == "ReferencedFrameNumber":
            value = element.value
            found.update(int(v) for v in (value if isinstance(value, list | tuple) else [value]))
        elif element.VR == "SQ":
            for child in element.value:
                _collect_frames(child, found)


def world_of_all_frames(tmp_path: Path) -> tuple[Settings, sessionmaker[Session]]:
    """`make_world` with the demo model's package of every frame (1.1.0) active."""
    settings, sessions, _ = make_world(tmp_path)
    with sessions() as session, session.begin():
        operator = Operator(os_user(), "test")
        register(session, package_of_all_frames(tmp_path), settings.registry_dir, operator)
        activate(session, "demo-chest-nodule", "1.1.0", operator)
    return settings, sessions


def test_a_multi_frame_image_is_reported_by_the_frame_with_the_nodule(tmp_path: Path) -> None:
    settings, sessions = world_of_all_frames(tmp_path)
    ds = three_frames(tmp_path / "frames")

    # What the model says of each frame on its own.
    loaded = load_model(tmp_path / "all-frames")
    inputs = np.stack([prepare(ds, loaded.manifest.input, f)[1] for f in range(3)])
    column = loaded.manifest.class_names.index("nodule")
    nodule = Classifier(loaded).probabilities(torch.from_numpy(inputs))[:, column]
    assert int(np.argmax(nodule)) + 1 == NODULE_FRAME, nodule

    ingest(settings, sessions, ds, tmp_path)
    (job_id,) = complete_quiet_studies(sessions, 0)
    JobRunner(settings, sessions, device="cpu").run_job(job_id)

    assert reported_frames(tmp_path / "delivered") == {
        "SR": {NODULE_FRAME},
        "OT": {NODULE_FRAME},
    }


def test_a_package_of_the_first_frame_reports_frame_one(tmp_path: Path) -> None:
    settings, sessions, _ = make_world(tmp_path)
    ingest(settings, sessions, three_frames(tmp_path / "frames"), tmp_path)
    (job_id,) = complete_quiet_studies(sessions, 0)
    JobRunner(settings, sessions, device="cpu").run_job(job_id)
    assert reported_frames(tmp_path / "delivered") == {"SR": {1}, "OT": {1}}


def test_a_single_frame_iod_of_several_frames_is_reported_by_its_first(tmp_path: Path) -> None:
    # Its references carry no frame number (PS3.3 C.10.1): the nodule of frame 3 was reported,
    # and a viewer drew its region on frame 1, which is clear.
    settings, sessions = world_of_all_frames(tmp_path)
    ds = three_frames(tmp_path / "frames")
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SINGLE_FRAME_SC
    del ds.FrameIncrementPointer, ds.FrameTime

    ingest(settings, sessions, ds, tmp_path)
    (job_id,) = complete_quiet_studies(sessions, 0)
    JobRunner(settings, sessions, device="cpu").run_job(job_id)

    with sessions() as session:
        (prediction,) = session.scalars(select(Prediction).where(Prediction.job_id == job_id))
        assert prediction.evaluated, prediction.reason
        assert not prediction.positive, "a frame other than the one the SR names was reported"
    assert reported_frames(tmp_path / "delivered") == {"SR": set(), "OT": set()}
