"""SEG of a multi-task model's mask and the Parametric Map of a heat map: valid, on the source."""

from __future__ import annotations

import dataclasses

import numpy as np
import pydicom
import pytest
from test_results import PEAK, STUDY_UID, _saved, make_context

from dicomai.results.context import ResultContext, SourceImage
from dicomai.results.pmap import build_heatmap_pmap, supports_pmap
from dicomai.results.seg import build_seg, has_mask
from dicomai.training.synthetic import write_dicom_images

CT, MR, CR, DX = range(4)


def _mask() -> np.ndarray:
    """A lesion mask at model input resolution (128²): a square around the heat-map peak."""
    mask = np.zeros((128, 128), dtype=np.float32)
    mask[PEAK[0] - 4 : PEAK[0] + 4, PEAK[1] - 4 : PEAK[1] + 4] = 0.9
    return mask


@pytest.fixture
def context(tmp_path) -> ResultContext:
    """CT (positive), MR (not evaluated), CR (negative) and a 256² synthetic DX, with masks."""
    base = make_context()
    written = write_dicom_images(tmp_path, 2, seed=5, size=256)
    dx = pydicom.dcmread(written[0].path)
    for keyword in ("PatientName", "PatientID", "StudyInstanceUID", "SpecificCharacterSet"):
        setattr(dx, keyword, base.sources[0].dataset.get(keyword))
    predictions = [
        dataclasses.replace(p, extra_maps={"segmentation": _mask()}) if p.evaluated else p
        for p in base.predictions
    ]
    predictions.append(dataclasses.replace(predictions[0], sop_instance_uid=dx.SOPInstanceUID))
    display = np.zeros((256, 256), dtype=np.uint8)
    return dataclasses.replace(
        base,
        sources=(*base.sources, SourceImage(dx, display)),
        predictions=tuple(predictions),
    )


@pytest.mark.parametrize("index", [CT, DX])  # CR is negative: no SEG (test_seg_findings.py)
def test_seg_is_valid_and_marks_the_mask_on_the_source(context, tmp_path, index):
    read = pydicom.dcmread(_saved(build_seg(context, index), tmp_path, f"seg{index}.dcm"))

    source = context.sources[index].dataset
    assert read.Modality == "SEG" and read.SegmentationType == "BINARY"
    assert read.StudyInstanceUID == STUDY_UID
    assert read.SOPInstanceUID == context.uid("seg", source.SOPInstanceUID)
    assert (read.Rows, read.Columns) == (source.Rows, source.Columns)
    reference = read.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0]
    assert reference.ReferencedSOPInstanceUID == source.SOPInstanceUID
    (segment,) = read.SegmentSequence
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == "36118008"
    assert segment.SegmentAlgorithmType == "AUTOMATIC"
    mask = read.pixel_array.astype(bool)
    scale = source.Rows / 128
    rows, columns = np.nonzero(mask)
    assert abs(rows.mean() - (PEAK[0] * scale - 0.5)) <= scale
    assert abs(columns.mean() - (PEAK[1] * scale - 0.5)) <= scale
    assert mask.sum() == pytest.approx((8 * scale) ** 2, rel=0.15)


def test_seg_of_an_empty_mask_is_still_valid(context, tmp_path):
    empty = dataclasses.replace(
        context.predictions[DX], extra_maps={"segmentation": np.zeros((128, 128), np.float32)}
    )
    changed = dataclasses.replace(context, predictions=(*context.predictions[:DX], empty))

    read = pydicom.dcmread(_saved(build_seg(changed, DX), tmp_path, "seg.dcm"))

    assert not read.pixel_array.any()


def test_no_seg_without_a_mask(context):
    plain = dataclasses.replace(context.predictions[CT], extra_maps=None)
    changed = dataclasses.replace(context, predictions=(plain, *context.predictions[1:]))

    assert not has_mask(changed, CT) and not has_mask(context, MR)
    with pytest.raises(ValueError, match="no segmentation mask"):
        build_seg(changed, CT)


def test_pmap_of_a_ct_heat_map_is_valid_and_peaks_at_the_heat_map_peak(context, tmp_path):
    read = pydicom.dcmread(_saved(build_heatmap_pmap(context, CT), tmp_path, "pmap.dcm"))

    source = context.sources[CT].dataset
    assert read.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30"  # Parametric Map Storage
    assert read.SOPInstanceUID == context.uid("pmap", source.SOPInstanceUID)
    assert read.FrameOfReferenceUID == source.FrameOfReferenceUID
    values = read.pixel_array
    assert values.dtype == np.float32 and values.shape == (source.Rows, source.Columns)
    assert np.unravel_index(int(np.argmax(values)), values.shape) == PEAK
    assert values.max() == pytest.approx(1.0, abs=1e-3)


def test_pmap_of_a_confident_negative_is_faint(context):
    cr_like = dataclasses.replace(
        context.predictions[CR], sop_instance_uid=context.sources[CT].dataset.SOPInstanceUID
    )
    changed = dataclasses.replace(context, predictions=(cr_like, *context.predictions[1:]))

    values = build_heatmap_pmap(changed, CT).pixel_array

    assert values.max() < 0.25, "a confident negative has a full-strength map"


def test_pmap_needs_a_heat_map_and_patient_geometry(context):
    assert supports_pmap(context, CT)
    assert not supports_pmap(context, MR), "MR was not evaluated: it has no heat map"
    assert not supports_pmap(context, CR) and not supports_pmap(context, DX)
    with pytest.raises(ValueError, match="patient geometry"):
        build_heatmap_pmap(context, DX)
