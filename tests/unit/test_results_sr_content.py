"""The SR's content tree as a viewer reads it: findings, probabilities, regions, the algorithm."""

from __future__ import annotations

import dataclasses
import re

import cv2
import highdicom as hd
import numpy as np
import pydicom
import pytest
from test_results import (
    MODEL,
    PEAK,
    PNEUMOTHORAX,
    PROBABILITY,
    STUDY_UID,
    _dsrdump,
    _saved,
    make_context,
)

from dicomai.results.context import ResultContext
from dicomai.results.hotspot import hot_spot_outline
from dicomai.results.sr import build_sr

UNCERTAINTY_MEANING = "+/-, range of measurement uncertainty"
PREDECESSOR = (STUDY_UID, "1.2.826.0.1.3680043.8.498.90", "1.2.826.0.1.3680043.8.498.91")


@pytest.fixture
def context() -> ResultContext:
    """CT (positive), MR (not evaluated) and a synthetic CR (negative) of one study."""
    return make_context()


def _groups(sr: pydicom.Dataset) -> list[pydicom.Dataset]:
    (measurements,) = [
        item for item in sr.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == "126010"
    ]
    return list(measurements.ContentSequence)


def _items(group: pydicom.Dataset, value_type: str) -> list[pydicom.Dataset]:
    return [item for item in group.ContentSequence if item.ValueType == value_type]


def _named(group: pydicom.Dataset, meaning: str) -> list[pydicom.Dataset]:
    return [
        item
        for item in group.ContentSequence
        if item.ConceptNameCodeSequence[0].CodeMeaning == meaning
    ]


def _group_of(sr: pydicom.Dataset, identifier: str) -> pydicom.Dataset:
    for group in _groups(sr):
        if _named(group, "Tracking Identifier")[0].TextValue == identifier:
            return group
    raise AssertionError(f"no measurement group {identifier!r}")


def test_dsrdump_shows_the_tree_a_viewer_reads(context, tmp_path):
    dump = _dsrdump(_saved(build_sr(context), tmp_path, "sr.dcm"))

    assert '<contains CODE:(,,"Finding")=(36118008,SCT,"Pneumothorax")>' in dump
    assert f'<contains NUM:(,,"Probability")="{PROBABILITY}" (1,UCUM,"no units")>' in dump
    assert '<contains CODE:(,,"Pneumothorax")=(52101004,SCT,"Present")>' in dump
    assert '<contains CODE:(,,"Pneumothorax")=(272519000,SCT,"Absent")>' in dump
    # A group per finding of each evaluated image (CT, CR) and one for the MR not evaluated.
    assert dump.count('"Tracking Unique Identifier")="2.25.') == 3, "a group lacks its UID"
    assert '<has concept mod TEXT:(,,"Algorithm Name")="chest-ptx">' in dump
    assert '<has concept mod TEXT:(,,"Algorithm Version")="1.2.0">' in dump
    # The positive CT finding is a region on the CT image; nothing else has one.
    assert dump.count('SCOORD:(,,"Image Region")=(POLYLINE,') == 1
    region = re.search(r'SCOORD:\(,,"Image Region"\).*\n\s*<selected from IMAGE:.*\(CT image', dump)
    assert region, f"the positive finding has no region on its CT image:\n{dump}"


def test_positive_region_surrounds_the_heat_map_peak_in_source_pixels(context):
    group = _group_of(build_sr(context), "finding pneumothorax image 1")

    (scoord,) = _items(group, "SCOORD")
    assert scoord.GraphicType == "POLYLINE"
    points = np.array(scoord.GraphicData, dtype=np.float32).reshape(-1, 2)
    assert (points[0] == points[-1]).all(), "the outline is not closed"
    assert scoord.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == (
        context.sources[0].dataset.SOPInstanceUID
    )
    # CT_small is 128² like the heat map: the peak's pixel centre in SCOORD coordinates.
    peak = (PEAK[1] + 0.5, PEAK[0] + 0.5)
    assert cv2.pointPolygonTest(points.reshape(-1, 1, 2), peak, False) > 0
    assert points.min() >= 0 and points.max() <= 128


def test_outline_is_scaled_from_model_input_to_the_source_size():
    heatmap = np.zeros((100, 200), dtype=np.float32)
    heatmap[40:60, 150:170] = 1.0

    points = hot_spot_outline(heatmap, rows=1000, columns=4000)

    assert (points.min(axis=0) == (150 * 20 + 10, 40 * 10 + 5)).all()
    assert (points.max(axis=0) == (169 * 20 + 10, 59 * 10 + 5)).all()
    single = np.zeros((8, 8), dtype=np.float32)
    single[3, 4] = 1.0
    corners = hot_spot_outline(single, rows=80, columns=80)
    assert len(corners) == 5 and (corners.min(axis=0) == (40, 30)).all()
    assert (corners.max(axis=0) == (50, 40)).all()


def multi_label(context: ResultContext) -> ResultContext:
    """The context of a multi-label model: its "normal" class gets groups of its own."""
    return dataclasses.replace(context, model=dataclasses.replace(context.model, multi_label=True))


def test_negative_and_non_finding_groups_have_no_region(context):
    sr = build_sr(multi_label(context))

    for identifier in ("finding normal image 1", "finding pneumothorax image 3"):
        group = _group_of(sr, identifier)
        assert not _items(group, "SCOORD"), identifier
        assert _named(group, "Source of Measurement"), identifier


def test_uncertainty_is_a_measurement_only_when_inference_gave_one(context, tmp_path):
    ct_prediction = context.predictions[0]
    # ImagePrediction.uncertainty: the spread inference estimated for the top finding.
    uncertain = dataclasses.replace(ct_prediction, uncertainty=0.0421)
    changed = dataclasses.replace(context, predictions=(uncertain, *context.predictions[1:]))
    sr = build_sr(multi_label(changed))
    _saved(sr, tmp_path, "sr.dcm")

    (value,) = _named(_group_of(sr, "finding pneumothorax image 1"), UNCERTAINTY_MEANING)
    assert float(value.MeasuredValueSequence[0].NumericValue) == pytest.approx(0.0421)
    assert not _named(_group_of(sr, "finding normal image 1"), UNCERTAINTY_MEANING)
    for group in _groups(build_sr(context)):
        assert not _named(group, UNCERTAINTY_MEANING), "an uncertainty no one estimated"


def _model_equipment(sr: pydicom.Dataset) -> pydicom.Dataset:
    (equipment,) = [
        item
        for item in sr.ContributingEquipmentSequence
        if item.get("ManufacturerModelName") == MODEL.name
    ]
    return equipment


def test_contributing_equipment_names_the_model_with_a_stable_device_uid(context):
    sr = build_sr(context)

    equipment = _model_equipment(sr)
    assert equipment.Manufacturer == "dicomai"
    assert equipment.SoftwareVersions == MODEL.version
    assert equipment.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"
    other_study = dataclasses.replace(context, input_digest="another input")
    assert _model_equipment(build_sr(other_study)).DeviceUID == equipment.DeviceUID
    retrained = dataclasses.replace(
        context, model=dataclasses.replace(MODEL, weights_sha256="cd" * 32)
    )
    assert context.device_uid != retrained.device_uid
    observer = [
        item
        for item in sr.ContentSequence
        if item.ConceptNameCodeSequence[0].CodeMeaning == "Device Observer UID"
    ]
    assert equipment.DeviceUID == observer[0].UID


def test_predecessor_sr_is_named_when_given(context, tmp_path):
    assert "PredecessorDocumentsSequence" not in build_sr(context)

    sr = build_sr(dataclasses.replace(context, predecessor=PREDECESSOR))
    read = pydicom.dcmread(_saved(sr, tmp_path, "sr.dcm"))

    (study,) = read.PredecessorDocumentsSequence
    (series,) = study.ReferencedSeriesSequence
    (instance,) = series.ReferencedSOPSequence
    assert (study.StudyInstanceUID, series.SeriesInstanceUID) == PREDECESSOR[:2]
    assert instance.ReferencedSOPInstanceUID == PREDECESSOR[2]
    assert instance.ReferencedSOPClassUID == read.SOPClassUID
    assert read.SOPInstanceUID != PREDECESSOR[2]


def test_finding_code_is_the_model_class_code(context):
    group = _group_of(build_sr(context), "finding pneumothorax image 1")

    (finding,) = _named(group, "Finding")
    code = finding.ConceptCodeSequence[0]
    assert (code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning) == (
        PNEUMOTHORAX.value,
        PNEUMOTHORAX.scheme,
        PNEUMOTHORAX.meaning,
    )


def test_highdicom_reads_the_written_sr_back_as_a_tid_1500_report(context, tmp_path):
    # build_sr hands highdicom's SR constructor a shell of the tree (see sr._shell): what is
    # written must still be the whole report that highdicom itself parses.
    read = pydicom.dcmread(_saved(build_sr(context), tmp_path, "sr.dcm"))

    report = hd.sr.Comprehensive3DSR.from_dataset(read).content

    assert isinstance(report, hd.sr.MeasurementReport)
    (region,) = report.get_planar_roi_measurement_groups()
    assert str(region.tracking_identifier) == "finding pneumothorax image 1"
    assert region.finding_type.value == PNEUMOTHORAX.value
    identifiers = {
        str(group.tracking_identifier) for group in report.get_image_measurement_groups()
    }
    assert identifiers == {"image 2 not evaluated", "finding pneumothorax image 3"}


def _library(sr: pydicom.Dataset) -> dict[str, list[str]]:
    """Descriptor names of each image library entry, by the SOP instance it describes."""
    (library,) = [
        item
        for item in sr.ContentSequence
        if item.ConceptNameCodeSequence[0].CodeMeaning == "Image Library"
    ]
    return {
        image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID: [
            descriptor.ConceptNameCodeSequence[0].CodeMeaning
            for descriptor in image.ContentSequence
        ]
        for group in library.ContentSequence
        for image in group.ContentSequence
        if image.ValueType == "IMAGE"
    }


def test_image_library_describes_geometry_wherever_a_source_has_it(context):
    ct, mr, cr = (source.dataset.SOPInstanceUID for source in context.sources)
    alone = dataclasses.replace(
        context, sources=context.sources[:1], predictions=context.predictions[:1]
    )

    # The CR lacks ImagerPixelSpacing: its entry alone falls back to what it has.
    mixed = _library(build_sr(context))
    assert mixed[cr] == ["Modality", "Pixel Data Rows", "Pixel Data Columns"]
    for uid in (ct, mr):
        assert "Horizontal Pixel Spacing" in mixed[uid] and "Slice Thickness" in mixed[uid]
    assert _library(build_sr(alone)) == {ct: mixed[ct]}


def _finding_names(sr: pydicom.Dataset) -> list[str]:
    return [
        _named(group, "Finding")[0].ConceptCodeSequence[0].CodeMeaning
        for group in _groups(sr)
        if _named(group, "Finding")
    ]


def test_a_single_label_models_normal_class_gets_no_group_of_its_own(context) -> None:
    # Its probability is one minus the finding's: a group each repeated the pneumothorax
    # groups in other words and made a third of a binary model's SR.
    assert _finding_names(build_sr(context)) == ["Pneumothorax", "Pneumothorax"]


def test_a_multi_label_models_every_label_is_reported(context) -> None:
    # "No Finding" of a multi-label model is a label of its own, not what the others leave.
    names = _finding_names(build_sr(multi_label(context)))
    assert names == ["Pneumothorax", "Normal", "Pneumothorax", "Normal"]
