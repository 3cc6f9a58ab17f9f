"""A study whose images the model cannot evaluate still gets an SR that says so and why."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from servers import dciodvfy
from sqlalchemy import select
from test_job_runner import ingest, make_world, sr_texts

from dicomai.db.models import Delivery, Instance, Job, JobState, OutputObject, Prediction
from dicomai.jobs.assembler import complete_quiet_studies
from dicomai.jobs.runner import JobRunner
from dicomai.training.synthetic import write_dicom_images

RAW_DATA_STORAGE = "1.2.840.10008.5.1.4.1.1.66"
PRIVATE_SOP_CLASS = "1.2.826.0.1.3680043.9.7433.1.1"


def one_image(tmp_path: Path) -> pydicom.Dataset:
    (written,) = write_dicom_images(tmp_path / "synthetic", 1, seed=11, size=128)
    return pydicom.dcmread(written.path)


def without_pixel_data(ds: pydicom.Dataset) -> pydicom.Dataset:
    del ds.PixelData
    return ds


def with_short_pixel_data(ds: pydicom.Dataset) -> pydicom.Dataset:
    ds.PixelData = ds.PixelData[:100]
    return ds


def run_only_job(tmp_path: Path, ds: pydicom.Dataset):
    """Store `ds` as the only instance of its study and run the study's job."""
    settings, sessions, _ = make_world(tmp_path)
    ingest(settings, sessions, ds, tmp_path)
    (job_id,) = complete_quiet_studies(sessions, 0)
    JobRunner(settings, sessions, device="cpu").run_job(job_id)
    return sessions, job_id


def referenced_uids(item: pydicom.Dataset) -> set[str]:
    """Every SOP instance an SR content tree references."""
    found = {str(ref.ReferencedSOPInstanceUID) for ref in item.get("ReferencedSOPSequence", [])}
    for child in item.get("ContentSequence", []):
        found |= referenced_uids(child)
    return found


@pytest.mark.parametrize(
    ("damage", "reason"),
    [(without_pixel_data, "no pixel data"), (with_short_pixel_data, "pixel data is 100 bytes")],
)
def test_an_only_image_that_cannot_be_evaluated_is_reported_as_not_evaluated(
    tmp_path: Path, damage, reason: str
) -> None:
    ds = damage(one_image(tmp_path))
    sessions, job_id = run_only_job(tmp_path, ds)

    with sessions() as session:
        job = session.get_one(Job, job_id)
        assert job.state == JobState.DONE, job.error
        kinds = session.scalars(select(OutputObject.kind)).all()
        assert kinds == ["sr"], f"the study got {kinds}, not one SR saying the image was skipped"
        (prediction,) = session.scalars(select(Prediction)).all()
        assert not prediction.evaluated and reason in (prediction.reason or ""), prediction.reason
        assert session.scalars(select(Delivery.state)).all() == ["sent"]

    (path,) = sorted((tmp_path / "delivered").iterdir())
    verdict = dciodvfy(path)
    assert verdict.ok, verdict.output
    sr = pydicom.dcmread(path)
    assert sr.StudyInstanceUID == ds.StudyInstanceUID
    assert str(ds.SOPInstanceUID) in referenced_uids(sr), "the SR does not name the image"
    texts = " | ".join(sr_texts(sr)).lower()
    assert "not evaluated" in texts and reason in texts, texts


def non_image(tmp_path: Path, sop_class_uid: str) -> pydicom.Dataset:
    ds = without_pixel_data(one_image(tmp_path))
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class_uid
    for keyword in ("Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit"):
        delattr(ds, keyword)
    return ds


def test_an_only_non_image_object_gets_no_job(tmp_path: Path) -> None:
    settings, sessions, _ = make_world(tmp_path)
    ingest(settings, sessions, non_image(tmp_path, RAW_DATA_STORAGE), tmp_path)
    assert complete_quiet_studies(sessions, 0) == []
    with sessions() as session:
        (instance,) = session.scalars(select(Instance)).all()
        assert instance.not_applicable == "not an image (Raw Data Storage)"


def test_an_object_of_a_private_class_without_pixels_gets_no_sr(tmp_path: Path) -> None:
    # A private SOP class is left to the model's scope: the worker finds it holds no image.
    sessions, job_id = run_only_job(tmp_path, non_image(tmp_path, PRIVATE_SOP_CLASS))

    with sessions() as session:
        assert session.get_one(Job, job_id).state == JobState.DONE
        (prediction,) = session.scalars(select(Prediction)).all()
        assert not prediction.evaluated and "not an image" in (prediction.reason or "")
        assert session.scalars(select(OutputObject)).all() == []
    assert not (tmp_path / "delivered").exists() or not any((tmp_path / "delivered").iterdir())


def test_an_image_without_rows_and_columns_does_not_fail_the_job(tmp_path: Path) -> None:
    good, sizeless = (
        pydicom.dcmread(w.path) for w in write_dicom_images(tmp_path / "two", 2, seed=5, size=128)
    )
    sizeless.StudyInstanceUID = good.StudyInstanceUID
    del sizeless.Rows, sizeless.Columns
    settings, sessions, _ = make_world(tmp_path)
    for ds in (good, sizeless):
        ingest(settings, sessions, ds, tmp_path)
    (job_id,) = complete_quiet_studies(sessions, 0)
    JobRunner(settings, sessions, device="cpu").run_job(job_id)

    with sessions() as session:
        job = session.get_one(Job, job_id)
        assert job.state == JobState.DONE, job.error
        reasons = [p.reason for p in session.scalars(select(Prediction)) if not p.evaluated]
        assert reasons == ["missing or invalid Rows/Columns"], reasons
    (sr,) = (
        pydicom.dcmread(p)
        for p in (tmp_path / "delivered").iterdir()
        if pydicom.dcmread(p).Modality == "SR"
    )
    assert referenced_uids(sr) >= {str(good.SOPInstanceUID)}
