"""Overlays copied from a study's first one are the overlays highdicom builds one by one."""

from __future__ import annotations

import copy
import dataclasses
import io

import numpy as np
import pydicom
import pytest
from dciodvfy import dciodvfy
from pydicom import Dataset
from test_results import make_context

from dicomai.results.context import ResultContext, SourceImage
from dicomai.results.sc import OverlayBuilder, build_sc

IMAGES = 12
TIMES = (
    "InstanceCreationDate",
    "InstanceCreationTime",
    "ContentDate",
    "ContentTime",
    "DateOfSecondaryCapture",
    "TimeOfSecondaryCapture",
)


def _slices() -> ResultContext:
    """CT slices of one study that differ in what an overlay says of its source: size,
    position, orientation, body part and laterality, lossy compression, probability."""
    base = make_context()
    ct = base.sources[0].dataset
    rng = np.random.default_rng(3)
    sources, predictions = [], []
    for index in range(IMAGES):
        ds = copy.deepcopy(ct)
        ds.SOPInstanceUID = f"1.2.826.0.1.3680043.8.498.78.{index + 1}"
        ds.ImagePositionPatient = [-158.1, -179.0, -75.7 + 2.5 * index]
        if index % 3 == 1:
            ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]  # sagittal
        if index % 4 == 2:
            ds.LossyImageCompression = "01"
        if index % 5 == 3:
            ds.BodyPartExamined = "LUNG"
            ds.Laterality = "R"
        size = 64 + 40 * (index % 3)  # overlays of 512², and 1024² wide
        display = rng.integers(0, 255, (size, size + 8 * (index % 2)), dtype=np.uint8)
        sources.append(SourceImage(ds, display))
        probability = float(rng.uniform())
        predictions.append(
            dataclasses.replace(
                base.predictions[0],
                sop_instance_uid=ds.SOPInstanceUID,
                scores=tuple(
                    dataclasses.replace(s, probability=p)
                    for s, p in zip(
                        base.predictions[0].scores, (probability, 1 - probability), strict=True
                    )
                ),
            )
        )
    return dataclasses.replace(base, sources=tuple(sources), predictions=tuple(predictions))


def _read(ds: Dataset) -> Dataset:
    """`ds` as written and read back, without the times at which it was made."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    read = pydicom.dcmread(io.BytesIO(buffer.getvalue()))
    for keyword in TIMES:
        read.pop(keyword, None)
    for item in read.ContributingEquipmentSequence:
        item.pop("ContributionDateTime", None)
    return read


def _differences(one: Dataset, other: Dataset) -> list[str]:
    keywords = {e.keyword or str(e.tag) for e in one} | {e.keyword or str(e.tag) for e in other}
    return sorted(k for k in keywords if one.get(k) != other.get(k))


def test_each_copied_overlay_equals_the_one_highdicom_builds_for_its_source() -> None:
    context = _slices()
    builder = OverlayBuilder(context)
    built = [builder.build(i) for i in range(IMAGES)]

    for index, overlay in enumerate(built):
        expected = _read(build_sc(context, index))
        copied = _read(overlay)
        assert _differences(copied, expected) == [], f"overlay {index + 1}"
        assert copied.file_meta == expected.file_meta, f"overlay {index + 1}"
        assert copied.PixelData == expected.PixelData
    assert len({o.SOPInstanceUID for o in built}) == IMAGES


def test_copies_leave_the_first_overlay_as_it_was() -> None:
    context = _slices()
    builder = OverlayBuilder(context)
    first = builder.build(0)
    before = io.BytesIO()
    first.save_as(before, enforce_file_format=True)

    for index in range(1, IMAGES):
        builder.build(index)

    after = io.BytesIO()
    first.save_as(after, enforce_file_format=True)
    assert after.getvalue() == before.getvalue()


@pytest.mark.parametrize("first", [0, 2], ids=["ct-first", "cr-first"])
def test_a_study_of_mixed_sources_gets_valid_overlays_each_with_its_sources_patient(
    tmp_path, first: int
) -> None:
    context = make_context()  # CT (evaluated), MR (not), CR (evaluated) of one study
    order = [first, 2 - first]
    context = dataclasses.replace(
        context,
        sources=tuple(context.sources[i] for i in order),
        predictions=tuple(context.predictions[i] for i in order),
    )
    builder = OverlayBuilder(context)

    for index in range(2):
        path = tmp_path / f"sc{index}.dcm"
        builder.build(index).save_as(path, enforce_file_format=True)
        ok, output = dciodvfy(path)
        assert ok, f"overlay {index + 1}: {output}"
        written = pydicom.dcmread(path)
        source = context.sources[index].dataset
        assert written.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert written.StudyInstanceUID == source.StudyInstanceUID
        for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex"):
            # Type 2 in the SC: empty where the source lacks it.
            assert str(written.get(keyword) or "") == str(source.get(keyword) or ""), keyword


def test_an_image_of_another_patient_in_the_study_keeps_its_own_patient_on_its_overlay() -> None:
    # A mis-filed image: its overlay was a copy of the first one, labelled with the first
    # image's patient.
    context = _slices()
    other = context.sources[4].dataset
    other.PatientID, other.PatientName = "PAT-B", "Beta^Bob"
    builder = OverlayBuilder(context)
    built = [builder.build(i) for i in range(IMAGES)]
    assert [(o.PatientID, str(o.PatientName)) for o in built].count(("PAT-B", "Beta^Bob")) == 1
    assert built[4].PatientID == "PAT-B" and built[5].PatientID == built[0].PatientID
    assert _differences(_read(built[5]), _read(build_sc(context, 5))) == []


def test_one_series_of_overlays_says_one_body_part_and_laterality() -> None:
    """General Series attributes: a PACS keeps the first instance's, so overlays of a right
    and an unsided image must not disagree; where every source agrees, they carry its value."""
    mixed = _slices()  # some slices say LUNG and R, the others nothing
    overlays = [OverlayBuilder(mixed).build(i) for i in range(IMAGES)]
    assert {(o.get("BodyPartExamined"), o.get("Laterality")) for o in overlays} == {(None, None)}

    for source in mixed.sources:
        source.dataset.BodyPartExamined = "LUNG"
        source.dataset.Laterality = "R"
    overlays = [OverlayBuilder(mixed).build(i) for i in range(IMAGES)]
    assert {(o.BodyPartExamined, o.Laterality) for o in overlays} == {("LUNG", "R")}
