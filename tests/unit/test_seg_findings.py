"""A SEG is sent only for a finding the SR reports Present, on a single-frame source."""

from __future__ import annotations

import dataclasses

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from test_results import NORMAL, PNEUMOTHORAX, _saved, make_context

from dicomai.inference.types import ClassScore, Code
from dicomai.results.context import ResultContext, SourceImage
from dicomai.results.seg import build_seg, has_mask

CT, MR, CR = range(3)
NODULE = Code("27925004", "SCT", "Nodule")


def _masked(context: ResultContext) -> ResultContext:
    """`context` with a lesion mask drawn on every evaluated image."""
    mask = np.zeros((128, 128), dtype=np.float32)
    mask[20:40, 80:100] = 0.9
    predictions = tuple(
        dataclasses.replace(p, extra_maps={"segmentation": mask}) if p.evaluated else p
        for p in context.predictions
    )
    return dataclasses.replace(context, predictions=predictions)


def _with_scores(context: ResultContext, index: int, explained: str, *scores: ClassScore):
    prediction = dataclasses.replace(context.predictions[index], scores=scores, explained=explained)
    predictions = list(context.predictions)
    predictions[index] = prediction
    return dataclasses.replace(context, predictions=tuple(predictions))


def test_no_seg_for_an_image_the_report_calls_negative():
    context = _masked(make_context())
    negative = context.predictions[CR]
    assert not negative.score("pneumothorax").positive, "the CR is meant to be negative"

    assert not has_mask(context, CR), "a mask of an Absent finding would be sent as a SEG"
    with pytest.raises(ValueError, match="positive finding"):
        build_seg(context, CR)


def test_no_seg_when_only_the_normal_class_is_above_its_threshold():
    # The reviewer's case: normal 0.9976, nodule 0.0024, the mask explained for the nodule.
    context = _with_scores(
        _masked(make_context()),
        CT,
        "nodule",
        ClassScore("normal", NORMAL, 0.9976, 0.5, False),
        ClassScore("nodule", NODULE, 0.0024, 0.5, True),
    )

    assert not has_mask(context, CT)


def test_the_segment_is_the_present_finding_not_an_absent_explained_one(tmp_path):
    # Multi-label: the most probable finding is Absent at its own threshold, a less
    # probable one Present; the mask explained for the Absent one still goes to a SEG
    # only as the Present one.
    context = _with_scores(
        _masked(make_context()),
        CT,
        "pneumothorax",
        ClassScore("pneumothorax", PNEUMOTHORAX, 0.6, 0.7, True),
        ClassScore("nodule", NODULE, 0.55, 0.5, True),
        ClassScore("normal", NORMAL, 0.1, 0.5, False),
    )

    assert has_mask(context, CT)
    read = pydicom.dcmread(_saved(build_seg(context, CT), tmp_path, "seg.dcm"))

    (segment,) = read.SegmentSequence
    assert segment.SegmentLabel == "nodule"
    assert segment.SegmentedPropertyTypeCodeSequence[0].CodeValue == NODULE.value


def test_the_segment_is_the_explained_finding_when_it_is_present():
    context = _with_scores(
        _masked(make_context()),
        CT,
        "nodule",
        ClassScore("pneumothorax", PNEUMOTHORAX, 0.9, 0.5, True),
        ClassScore("nodule", NODULE, 0.6, 0.5, True),
    )

    (segment,) = build_seg(context, CT).SegmentSequence

    assert segment.SegmentLabel == "nodule"


@pytest.mark.parametrize("name", ["examples_ybr_color.dcm", "rtdose.dcm"])
def test_no_seg_for_a_multi_frame_source(name):
    # US without a frame of reference, RT Dose without functional groups: highdicom cannot
    # reference the one frame the model saw, and the job logged an error for each.
    base = _masked(make_context())
    source = pydicom.dcmread(get_testdata_file(name, download=False))
    assert int(source.NumberOfFrames) > 1
    display = np.zeros((int(source.Rows), int(source.Columns)), dtype=np.uint8)
    prediction = dataclasses.replace(
        base.predictions[CT], sop_instance_uid=str(source.SOPInstanceUID)
    )
    context = dataclasses.replace(
        base, sources=(SourceImage(source, display),), predictions=(prediction,)
    )
    assert prediction.score("pneumothorax").positive

    assert not has_mask(context, 0)
    with pytest.raises(ValueError, match="single frame"):
        build_seg(context, 0)
