"""Items of one shape built once and filled in give the SR that highdicom builds item by item."""

from __future__ import annotations

import copy
import dataclasses
import io

import highdicom as hd
import numpy as np
import pydicom
import pytest
from dciodvfy import dciodvfy
from pydicom import Dataset
from pydicom.data import get_testdata_file
from test_results import _evaluated, make_context

from dicomai.inference.types import ImagePrediction
from dicomai.results import sr_items
from dicomai.results.context import ResultContext, SourceImage
from dicomai.results.sr import build_sr, reported_scores
from dicomai.results.sr_items import ItemSpec, ItemTemplates, encode_item

IMAGES = 40


def _heatmap(rng: np.random.Generator) -> np.ndarray:
    """A blob at a random place and of a random size: outlines of different lengths."""
    rows, columns = np.mgrid[:64, :64]
    centre = rng.uniform(10, 54, 2)
    width = rng.uniform(10, 120)
    return np.exp(-((rows - centre[0]) ** 2 + (columns - centre[1]) ** 2) / width).astype(
        np.float32
    )


def _prediction(ds: Dataset, rng: np.random.Generator, index: int) -> ImagePrediction:
    uncertainty = float(rng.uniform(0, 0.2)) if index % 3 else None
    evaluated = _evaluated(ds, float(rng.uniform()))
    return dataclasses.replace(evaluated, heatmap=_heatmap(rng), uncertainty=uncertainty)


def _study() -> ResultContext:
    """CT slices at different positions and sizes, a multi-frame US image, the unit tests' MR
    (not evaluated) and CR (no geometry), with random probabilities, spreads and hot spots."""
    base = make_context()
    rng = np.random.default_rng(7)
    ct = base.sources[0].dataset
    sources, predictions = [], []
    for index in range(IMAGES):
        ds = copy.deepcopy(ct)
        ds.SOPInstanceUID = f"1.2.826.0.1.3680043.8.498.77.{index + 1}"
        ds.ImagePositionPatient = [-158.135803, -179.035797, -75.699997 + 2.5 * index]
        if index % 7 == 3:
            ds.PixelSpacing = [0.5, 0.5]
            ds.Rows = ds.Columns = 64 + index
        sources.append(SourceImage(ds, base.sources[0].display))
        predictions.append(_prediction(ds, rng, index))
    us = pydicom.dcmread(get_testdata_file("examples_ybr_color.dcm", download=False))
    for keyword in ("StudyInstanceUID", "PatientName", "PatientID", "SpecificCharacterSet"):
        setattr(us, keyword, ct[keyword].value)
    sources.append(SourceImage(us, base.sources[0].display))
    predictions.append(_prediction(us, rng, 1))
    sources += base.sources[1:]
    mr_not_evaluated = dataclasses.replace(base.predictions[1], reason="Größe: nicht auswertbar")
    predictions += [mr_not_evaluated, base.predictions[2]]
    return dataclasses.replace(base, sources=tuple(sources), predictions=tuple(predictions))


def _read(ds: Dataset) -> Dataset:
    """`ds` as written and read back, without the times at which it was made."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    read = pydicom.dcmread(io.BytesIO(buffer.getvalue()))
    for keyword in ("InstanceCreationDate", "InstanceCreationTime", "ContentDate", "ContentTime"):
        read.pop(keyword, None)
    for item in read.ContributingEquipmentSequence:
        item.pop("ContributionDateTime", None)
    return read


def test_reused_items_give_the_sr_that_highdicom_builds_item_by_item(tmp_path, monkeypatch):
    context = _study()
    encoded = []

    def counting(item, encodings):
        encoded.append(item)
        return encode_item(item, encodings)

    monkeypatch.setattr(sr_items, "encode_item", counting)
    reused = _read(build_sr(context))
    built = len(encoded)
    one_by_one = _read(build_sr(context, reuse_items=False))

    assert reused == one_by_one
    # 43 library entries and 43 groups, of a dozen shapes: most items were filled in.
    assert built < 40 < len(encoded) - built
    report = hd.sr.Comprehensive3DSR.from_dataset(reused).content
    groups = report.get_image_measurement_groups() + report.get_planar_roi_measurement_groups()
    multi = context.model.multi_label
    expected = sum(
        len(reported_scores(p.scores, multi)) if p.evaluated else 1 for p in context.predictions
    )
    assert len(groups) == expected
    path = tmp_path / "sr.dcm"
    build_sr(context).save_as(path, enforce_file_format=True)
    ok, output = dciodvfy(path)
    assert ok, output


def test_templates_kept_from_another_models_sr_fill_in_this_models_identity():
    context = _study()
    model = dataclasses.replace(context.model, name="other-model", version="9.9")
    other = dataclasses.replace(context, model=model)
    first = _read(build_sr(context))

    assert _read(build_sr(other)) == _read(build_sr(other, reuse_items=False))
    assert _read(build_sr(context)) == first


def test_sr_of_a_study_names_every_source_in_its_image_library():
    context = _study()

    sr = _read(build_sr(context))

    library = next(
        item for item in sr.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == "111028"
    )
    listed = [
        entry.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        for group in library.ContentSequence
        for entry in group.ContentSequence
        if entry.ValueType == "IMAGE"
    ]
    assert sorted(listed) == sorted(str(s.dataset.SOPInstanceUID) for s in context.sources)


def _text_item(fields) -> Dataset:
    return hd.sr.TextContentItem(
        name=hd.sr.CodedConcept("121106", "DCM", "Comment"),
        value=fields["text"],
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )


@pytest.mark.parametrize("encodings", [["iso8859"], ["utf_8"]])
def test_a_template_renders_values_of_any_length_as_highdicom_would(encodings):
    templates = ItemTemplates(encodings)
    texts = ["a", "ab", "abc", "a much longer comment than the first", "x" * 301]
    if encodings == ["utf_8"]:
        texts.append("Größe")

    rendered = [
        templates.item(ItemSpec("text", {"text": text}, {"text": "QZ marker"}, _text_item))
        for text in texts
    ]

    assert rendered == [encode_item(_text_item({"text": text}), encodings) for text in texts]


def test_a_shape_whose_template_misses_a_value_is_built_by_highdicom_each_time():
    calls = []

    def shouting(fields) -> Dataset:
        calls.append(fields["text"])
        return _text_item({"text": fields["text"].upper()})  # the marker is never found as is

    templates = ItemTemplates(["iso8859"])
    texts = ["first", "second", "third"]

    rendered = [
        templates.item(ItemSpec("text", {"text": t}, {"text": "qz marker"}, shouting))
        for t in texts
    ]

    assert rendered == [encode_item(_text_item({"text": t.upper()}), ["iso8859"]) for t in texts]
    assert calls == ["first", "qz marker", "second", "third"]
