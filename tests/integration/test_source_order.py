"""The results follow the study's viewing order, not the order of its UIDs: "image n" of the
SR and the overlay numbered n are the image a viewer shows n-th."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import Dataset
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag
from sqlalchemy import select, update
from test_job_runner import ingest, make_world

from dicomai.db.models import Job, JobState, OutputObject
from dicomai.ingest.spool import Spool
from dicomai.jobs.assembler import complete_quiet_studies
from dicomai.jobs.reading import ReadImage, viewing_order
from dicomai.jobs.runner import JobRunner
from dicomai.results.context import SourceImage
from dicomai.training.synthetic import write_dicom_images

ROOT = "1.2.826.0.1.3680043.10.543"

# (Series Number, Instance Number or None, SOP UID's last component), in viewing order. The
# UIDs sort the other way round, and Instance Number 10 comes after 2, not before it as text.
STUDY = [(1, 1, "9"), (1, 2, "8"), (1, 10, "7"), (2, 1, "6"), (2, None, "5")]


def study_in_viewing_order(tmp_path: Path, study: int) -> list[Dataset]:
    """One study of two series as `STUDY` numbers them, in viewing order."""
    written = write_dicom_images(
        tmp_path / f"images-{study}", len(STUDY), seed=40 + study, size=128
    )
    datasets = []
    for w, (series, instance, last) in zip(written, STUDY, strict=True):
        ds = pydicom.dcmread(w.path)
        ds.StudyInstanceUID = f"{ROOT}.{study}"
        ds.SeriesInstanceUID = f"{ROOT}.{study}.{series}"
        ds.SeriesNumber = series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"{ROOT}.{study}.0.{last}"
        if instance is None:
            del ds.InstanceNumber
        else:
            ds.InstanceNumber = instance
        datasets.append(ds)
    uids = [str(ds.SOPInstanceUID) for ds in datasets]
    assert sorted(uids) == uids[::-1], "the UIDs must sort against the viewing order"
    return datasets


def outputs(settings, sessions, job_id: int) -> dict[str, list[Dataset]]:
    spool = Spool(settings.outputs_dir)
    found: dict[str, list[Dataset]] = {}
    with sessions() as session:
        for row in session.scalars(select(OutputObject).where(OutputObject.job_id == job_id)):
            found.setdefault(row.kind, []).append(pydicom.dcmread(spool.path(row.path)))
    return found


def items(container: Dataset, meaning: str) -> list[Dataset]:
    """The children of `container` whose concept name is `meaning`."""
    return [
        item
        for item in container.get("ContentSequence", [])
        if item.ConceptNameCodeSequence[0].CodeMeaning == meaning
    ]


def numbered_images(sr: Dataset) -> dict[int, set[str]]:
    """n of each measurement group's "... image n" → the SOP UIDs the group references."""
    (measurements,) = items(sr, "Imaging Measurements")
    found: dict[int, set[str]] = {}
    for group in measurements.ContentSequence:
        (tracking,) = items(group, "Tracking Identifier")
        n = int(re.fullmatch(r".* image (\d+)( not evaluated)?", tracking.TextValue)[1])
        referenced = {
            str(e.value) for e in group.iterall() if e.keyword == "ReferencedSOPInstanceUID"
        }
        found.setdefault(n, set()).update(referenced)
    return found


def library(sr: Dataset) -> list[str]:
    """The SOP UIDs of the SR's image library, in its order."""
    (images,) = items(sr, "Image Library")
    return [
        str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
        for group in images.ContentSequence
        for item in group.ContentSequence
        if item.ValueType == "IMAGE"
    ]


def assert_in_viewing_order(settings, sessions, job_id: int, datasets: list[Dataset]) -> Dataset:
    """The job's SR and overlays number the images as `datasets` are ordered; its SR."""
    expected = [str(ds.SOPInstanceUID) for ds in datasets]
    found = outputs(settings, sessions, job_id)
    (sr,) = found["sr"]
    assert numbered_images(sr) == {n: {uid} for n, uid in enumerate(expected, 1)}, (
        "SR 'image n' is not the study's n-th image"
    )
    assert library(sr) == expected, "the image library is not in the study's viewing order"
    overlays = {int(sc.InstanceNumber): sc for sc in found["sc"]}
    assert sorted(overlays) == list(range(1, len(expected) + 1)), "an image has no overlay"
    for n, uid in enumerate(expected, 1):
        (source,) = overlays[n].SourceImageSequence
        assert source.ReferencedSOPInstanceUID == uid, f"overlay {n} is beside another image"
    return sr


def test_sr_image_n_and_overlay_n_are_the_studys_nth_image(tmp_path) -> None:
    settings, sessions, _ = make_world(tmp_path)
    datasets = study_in_viewing_order(tmp_path, 1)
    for ds in reversed(datasets):
        ingest(settings, sessions, ds, tmp_path)
    (job_id,) = complete_quiet_studies(sessions, 0)
    runner = JobRunner(settings, sessions, device="cpu")
    runner.run_job(job_id)
    with sessions() as session:
        job = session.get_one(Job, job_id)
        assert job.state == JobState.DONE, job.error
    first = assert_in_viewing_order(settings, sessions, job_id, datasets)

    # A retried job builds the same objects: the same order, so the same numbers.
    with sessions() as session, session.begin():
        session.execute(update(Job).values(state=JobState.QUEUED))
    runner.run_job(job_id)
    again = assert_in_viewing_order(settings, sessions, job_id, datasets)
    assert again.SOPInstanceUID == first.SOPInstanceUID
    assert numbered_images(again) == numbered_images(first)
    # And the same time: an SR an earlier attempt sent and a retry's overlays agree on it.
    assert (again.ContentDate, again.ContentTime) == (first.ContentDate, first.ContentTime)
    for overlay in outputs(settings, sessions, job_id)["sc"]:
        assert (overlay.ContentDate, overlay.ContentTime) == (first.ContentDate, first.ContentTime)


def test_jobs_batched_together_each_keep_their_studys_order(tmp_path) -> None:
    settings, sessions, _ = make_world(tmp_path, batch_window_seconds=0.2, decode_threads=2)
    studies = [study_in_viewing_order(tmp_path, study) for study in (1, 2)]
    for datasets in studies:
        for ds in reversed(datasets):
            ingest(settings, sessions, ds, tmp_path)
    job_ids = complete_quiet_studies(sessions, 0)
    assert len(job_ids) == 2
    JobRunner(settings, sessions, device="cpu").run_job(job_ids[0])
    with sessions() as session:
        jobs = {j.study.study_uid: j for j in session.scalars(select(Job))}
        assert [j.state for j in jobs.values()] == [JobState.DONE] * 2, "not run together"
        by_study = {uid: j.id for uid, j in jobs.items()}
    for datasets in studies:
        job_id = by_study[str(datasets[0].StudyInstanceUID)]
        assert_in_viewing_order(settings, sessions, job_id, datasets)


def read_image(uid: str, **values: bytes) -> ReadImage:
    """An image whose header holds `values` as a file gives them, unchecked."""
    ds = Dataset()
    for keyword, value in values.items():
        tag = Tag(keyword)
        ds[tag] = RawDataElement(tag, "IS", len(value), value, 0, True, True)
    return ReadImage(uid, SourceImage(ds, np.zeros((1, 1), np.uint8)), None)


@pytest.mark.filterwarnings("ignore:Invalid value for VR IS")
def test_missing_or_malformed_numbers_sort_last_and_instances_without_source_after() -> None:
    images = [
        ReadImage("1.1", None, None, "not an image (no Pixel Data)"),
        read_image("1.2", SeriesNumber=b"1 ", InstanceNumber=b"1\\2 "),
        read_image("1.3", SeriesNumber=b"1 ", InstanceNumber=b"abc "),
        read_image("1.4", SeriesNumber=b"1 ", InstanceNumber=b"3 "),
        read_image("1.5", InstanceNumber=b"1 "),
        read_image("1.6", SeriesNumber=b"1 "),
        read_image("1.7", SeriesNumber=b"1 ", InstanceNumber=b"12 "),
    ]
    ordered = [image.sop_uid for image in sorted(images, key=viewing_order)]
    assert ordered == ["1.4", "1.7", "1.2", "1.3", "1.6", "1.5", "1.1"]
