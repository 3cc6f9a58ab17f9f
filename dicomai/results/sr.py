"""The findings of one model run on one study as a TID 1500 Comprehensive 3D SR."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, cast

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.charset import convert_encodings
from pydicom.filewriter import correct_ambiguous_vr
from pydicom.sr.codedict import codes as dcm_codes
from pydicom.uid import ExplicitVRLittleEndian

from dicomai.inference.types import ClassScore, ImagePrediction
from dicomai.results import codes, sr_library
from dicomai.results.context import ModelIdentity, ResultContext, SourceImage
from dicomai.results.hotspot import has_hot_spot, hot_spot_outline
from dicomai.results.sr_items import ItemSpec, ItemTemplates, encode_item, raw_sequence

SR_SERIES_NUMBER = 9001
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


def build_sr(context: ResultContext, reuse_items: bool = True) -> Dataset:
    """Build the Comprehensive 3D SR that reports a model run on a study.

    The content is a TID 1500 Measurement Report observed by the model as a device: an image
    library of every source, and per source image and model class one measurement group with
    a tracking identifier and UID, the class as finding, its calibrated probability (and its
    uncertainty where the prediction has one) and, for finding classes, Present or Absent.
    The group of a positive finding that the heat map explains is a planar ROI (TID 1410)
    whose region outlines the heat map's hot spot on the source image. A source that was not
    evaluated gets one group saying so and why. When ``context.predecessor`` is set, the SR
    names that earlier SR in its Predecessor Documents Sequence.

    Parameters
    ----------
    context
        Sources, predictions (``predictions[i]`` for ``sources[i]``) and model identity.
    reuse_items
        Build library entries and measurement groups of one shape once and fill the others
        in (`dicomai.results.sr_items`); False builds each with highdicom.

    Returns
    -------
    pydicom.Dataset
        The SR, in Explicit VR Little Endian, with UIDs derived from `context`, so that
        building it again from the same context gives the same object. Its image library
        entries and measurement groups are held encoded, as pydicom reads them from a file.

    Raises
    ------
    ValueError
        If `context` holds no sources, or not one prediction per source.
    """
    _check_context(context)
    groups = _measurement_groups(context)
    entries = sr_library.library([source.dataset for source in context.sources])
    root = hd.sr.MeasurementReport(
        observation_context=_observation_context(context),
        procedure_reported=codes.IMAGING_PROCEDURE,
        imaging_measurements=[cast(Group, groups[0].build(groups[0].values))],
        referenced_images=entries.headers,
    )[0]
    document = hd.sr.Comprehensive3DSR(
        evidence=_evidence(context),
        content=_shell(root),
        series_instance_uid=context.uid("sr-series"),
        series_number=context.series_number(SR_SERIES_NUMBER),
        sop_instance_uid=context.uid("sr"),
        instance_number=1,
        manufacturer=codes.MANUFACTURER,
        is_complete=True,
        series_description=codes.series_description(
            context.series_title("AI findings"), context.model
        ),
        software_versions=context.model.software_version,
        contributing_equipment=[codes.model_equipment(context.model, context.device_uid)],
        previous_versions=_predecessors(context),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        # The time the overlays' captions show beside the report's number.
        content_date=context.created.date(),
        content_time=context.created.time(),
    )
    correct_ambiguous_vr(root, True)
    encodings = convert_encodings(document.get("SpecificCharacterSet") or "ISO_IR 6")
    templates = ItemTemplates(encodings, reuse_items, _shared_templates(encodings, context.model))
    _fill(root, templates, groups, entries)
    document.ContentSequence = root.ContentSequence
    plain = _plain(document)
    _as_encoded(plain)
    return plain


# Templates outlive their SR: a worker reports one model's findings on study after study,
# and building each shape's template with highdicom took 40 of the 70 ms that a 1-image
# study's SR took to build. An item's build takes from its document the character sets and
# the model (its TID 4019 algorithm identification), and nothing else: they are the key.
_TEMPLATES: OrderedDict[tuple[tuple[str, ...], ModelIdentity], dict[Hashable, Any]] = OrderedDict()
_TEMPLATE_DOCUMENTS = 16
_TEMPLATES_LOCK = threading.Lock()


def _shared_templates(encodings: Sequence[str], model: ModelIdentity) -> dict[Hashable, Any]:
    key = (tuple(encodings), model)
    with _TEMPLATES_LOCK:
        templates = _TEMPLATES.pop(key, None)
        if templates is None:
            templates = {}
        _TEMPLATES[key] = templates
        while len(_TEMPLATES) > _TEMPLATE_DOCUMENTS:
            _TEMPLATES.popitem(last=False)
    return templates


def _fill(
    root: Dataset, templates: ItemTemplates, groups: list[ItemSpec], entries: sr_library.Library
) -> None:
    """Put every measurement group and library entry into the report's two containers."""
    for container in root.ContentSequence:
        name = container.ConceptNameCodeSequence[0].CodeValue
        if name == _IMAGING_MEASUREMENTS:
            items = [templates.item(group) for group in groups]
            container[_CONTENT] = raw_sequence(_CONTENT, items)
        elif name == _IMAGE_LIBRARY:
            for library_group in container.ContentSequence:
                kept = [i for i in library_group.ContentSequence if i.ValueType != "IMAGE"]
                built = [
                    i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
                    for i in library_group.ContentSequence
                    if i.ValueType == "IMAGE"
                ]
                items = [encode_item(item, templates.encodings) for item in kept]
                items += [templates.item(entry) for entry in entries.members(built)]
                library_group[_CONTENT] = raw_sequence(_CONTENT, items)


def _as_encoded(dataset: Dataset) -> None:
    """Mark `dataset` and its items as read in explicit VR little endian.

    pydicom then writes the encoded items as they are, and does not look through every item
    again for ambiguous VRs (there are none: the tree was corrected once, in `build_sr`).
    """
    dataset.set_original_encoding(False, True, dataset._character_set)
    for element in dataset._dict.values():
        if not element.is_raw and element.VR == "SQ":
            for item in cast(Sequence[Dataset], element.value):
                _as_encoded(item)


def _evidence(context: ResultContext) -> list[Dataset]:
    """The sources as highdicom's evidence: the first in full, for its patient and study.

    highdicom reads only the four UIDs of the others (for the Current Requested Procedure
    Evidence Sequence), so they are not copied whole.
    """
    evidence = [codes.source_header(context.sources[0].dataset, _own_text(context))]
    for source in context.sources[1:]:
        reference = Dataset()
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID", "SOPInstanceUID"):
            setattr(reference, keyword, source.dataset[keyword].value)
        evidence.append(reference)
    return evidence


def _own_text(context: ResultContext) -> list[str]:
    """The text the report adds to the source's: the model's words and the classes' names."""
    model = context.model
    text = [model.name, model.version, model.architecture, model.manufacturer]
    for prediction in context.predictions:
        text.append(prediction.reason or "")
        for score in prediction.scores:
            text += [score.name, score.code.value, score.code.meaning, score.code.scheme]
    return text


def _shell(root: Dataset) -> Dataset:
    """The report's root container with its first child only, for highdicom's SR constructor.

    The constructor deep-copies and re-parses the content it is given and searches it for
    every image reference; for a 100-image study that took 6 of the SR's 10 s (bench/RESULTS.md,
    End-to-end latency). Every reference in the tree is to a source that the evidence lists,
    so the document is made around this shell and given the whole tree after.
    """
    shell = Dataset()
    for element in root:
        if element.keyword != "ContentSequence":
            shell.add(element)
    shell.ContentSequence = [root.ContentSequence[0]]
    return shell


def _plain(document: hd.sr.Comprehensive3DSR) -> Dataset:
    """The document as a plain dataset: highdicom's parsed view of it holds the shell only."""
    plain = Dataset(document)
    plain.file_meta = document.file_meta
    plain.preamble = document.preamble
    return plain


def _predecessors(context: ResultContext) -> list[Dataset] | None:
    """The earlier SR of this study and model, as highdicom reads a previous version."""
    if context.predecessor is None:
        return None
    previous = Dataset()
    previous.StudyInstanceUID, previous.SeriesInstanceUID, previous.SOPInstanceUID = (
        context.predecessor
    )
    previous.SOPClassUID = COMPREHENSIVE_3D_SR
    return [previous]


def _check_context(context: ResultContext) -> None:
    if not context.sources:
        raise ValueError("a result needs at least one source image")
    if len(context.predictions) != len(context.sources):
        raise ValueError(
            f"{len(context.predictions)} predictions for {len(context.sources)} source images"
        )


def _observation_context(context: ResultContext) -> hd.sr.ObservationContext:
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=context.device_uid,
        name=context.model.name,
        manufacturer_name=context.model.manufacturer,
        model_name=codes.model_label(context.model),
    )
    return hd.sr.ObservationContext(
        observer_device_context=hd.sr.ObserverContext(
            observer_type=dcm_codes.cid270.Device,
            observer_identifying_attributes=device,
        )
    )


def _algorithm(model: ModelIdentity) -> hd.sr.AlgorithmIdentification:
    parameters = [f"architecture={model.architecture}", f"weights_sha256={model.weights_sha256}"]
    if model.explanation:
        parameters.append(f"explanation={model.explanation}")
    return hd.sr.AlgorithmIdentification(
        name=model.name,
        version=model.version,
        parameters=parameters,
        manufacturer=model.manufacturer,
    )


Group = (
    hd.sr.MeasurementsAndQualitativeEvaluations
    | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
)
# Markers for the fields of a measurement group (see `dicomai.results.sr_items`).
_GROUP_MARKERS = {
    "tracking_uid": "1.2.826.0.1.3680043.10.1187.8001",
    "tracking_text": "QZ tracking 8002",
    "sop_instance_uid": "1.2.826.0.1.3680043.10.1187.8003",
    "probability": 0.987659,
    "uncertainty": 0.876549,
    "outline": np.array([[9001.5, 9002.5], [9003.5, 9004.5], [9005.5, 9006.5], [9001.5, 9002.5]]),
    "reason": "QZ reason 8004",
}
_IMAGING_MEASUREMENTS = "126010"
_IMAGE_LIBRARY = "111028"
_CONTENT = 0x0040A730  # Content Sequence


def _measurement_groups(context: ResultContext) -> list[ItemSpec]:
    # One TID 4019 subtree serves every group: its items are only read after this, and
    # building it per group was an eighth of the groups' time.
    algorithm = _algorithm(context.model)
    groups: list[ItemSpec] = []
    for index, prediction in enumerate(context.predictions):
        if not prediction.evaluated:
            groups.append(_not_evaluated_group(context, index, prediction, algorithm))
            continue
        for score in reported_scores(prediction.scores, context.model.multi_label):
            groups.append(_finding_group(context, index, prediction, score, algorithm))
    return groups


def reported_scores(scores: Sequence[ClassScore], multi_label: bool) -> list[ClassScore]:
    """The classes an image's measurement groups report: the findings of a single-label model.

    Its other classes ("normal") hold what the findings leave, one minus their probabilities
    summed: a group each repeated the finding's groups in other words and was a third of a
    binary model's SR (which the PACS stores at ~9 us a data element). A multi-label model's
    classes are independent ("No Finding" is a label of its own), and a model without finding
    classes has nothing else to report: all their classes are reported.
    """
    if multi_label or not any(score.is_finding for score in scores):
        return list(scores)
    return [score for score in scores if score.is_finding]


def _source_fields(context: ResultContext, index: int, kind: str) -> dict[str, Any]:
    sop_uid = str(context.sources[index].dataset.SOPInstanceUID)
    if kind == "not-evaluated":
        suffix, label = kind, f"image {index + 1} not evaluated"
    else:
        suffix, label = kind.removeprefix("finding "), f"{kind} image {index + 1}"
    return {
        "tracking_uid": context.tracking_uid(sop_uid, suffix),
        "tracking_text": label,
        "sop_instance_uid": sop_uid,
    }


def _image_shape(source: SourceImage) -> tuple[str, int | None]:
    """The source's SOP class and, for a multi-frame one, the number of the frame the result
    is for (see `SourceImage.frame`)."""
    dataset = source.dataset
    frame = source.frame + 1 if codes.referenced_as_multi_frame(dataset) else None
    return str(dataset.SOPClassUID), frame


def _source_reference(
    image: tuple[str, int | None], fields: Mapping[str, Any]
) -> hd.sr.SourceImageForMeasurementGroup:
    sop_class, frame = image
    return hd.sr.SourceImageForMeasurementGroup(
        referenced_sop_class_uid=sop_class,
        referenced_sop_instance_uid=fields["sop_instance_uid"],
        referenced_frame_numbers=None if frame is None else [frame],
    )


def _tracking(fields: Mapping[str, Any]) -> hd.sr.TrackingIdentifier:
    return hd.sr.TrackingIdentifier(uid=fields["tracking_uid"], identifier=fields["tracking_text"])


def _finding_group(
    context: ResultContext,
    index: int,
    prediction: ImagePrediction,
    score: ClassScore,
    algorithm: hd.sr.AlgorithmIdentification,
) -> ItemSpec:
    dataset = context.sources[index].dataset
    values = _source_fields(context, index, f"finding {score.name}")
    values["probability"] = codes.shown_probability(score, 4)
    uncertainty = _uncertainty(prediction, score)
    if uncertainty is not None:
        values["uncertainty"] = uncertainty
    heatmap = prediction.heatmap
    # A map of zeros (every weighted activation cut by the ReLU) has no hot spot to outline:
    # the finding is reported against its image, as without a map; the report failed before.
    roi = score.positive and prediction.explained == score.name and has_hot_spot(heatmap)
    if roi and heatmap is not None:
        values["outline"] = hot_spot_outline(heatmap, int(dataset.Rows), int(dataset.Columns))
    image = _image_shape(context.sources[index])
    present = (codes.PRESENT if score.positive else codes.ABSENT) if score.is_finding else None

    def build(fields: Mapping[str, Any]) -> Group:
        finding = codes.coded(score.code)
        evaluations = None
        if present is not None:
            evaluations = [hd.sr.QualitativeEvaluation(finding, present)]
        measurements = _measurements(fields)
        if roi:
            return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=_tracking(fields),
                referenced_region=_hot_spot_region(image, fields),
                finding_type=finding,
                algorithm_id=algorithm,
                measurements=measurements,
                qualitative_evaluations=evaluations,
            )
        return hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=_tracking(fields),
            finding_type=finding,
            algorithm_id=algorithm,
            measurements=measurements,
            qualitative_evaluations=evaluations,
            source_images=[_source_reference(image, fields)],
        )

    shape = ("finding", score.name, score.code, present, roi, "uncertainty" in values, image)
    return ItemSpec(shape, values, _markers(values), build)


def _markers(values: Mapping[str, Any]) -> dict[str, Any]:
    return {field: _GROUP_MARKERS[field] for field in values}


def _measurements(fields: Mapping[str, Any]) -> list[hd.sr.Measurement]:
    # Four decimals: more than calibration supports, and a DS of at most 16 characters.
    measurements = [
        hd.sr.Measurement(name=codes.PROBABILITY, value=fields["probability"], unit=codes.NO_UNITS)
    ]
    if "uncertainty" in fields:
        measurements.append(
            hd.sr.Measurement(
                name=codes.UNCERTAINTY, value=fields["uncertainty"], unit=codes.NO_UNITS
            )
        )
    return measurements


def _uncertainty(prediction: ImagePrediction, score: ClassScore) -> float | None:
    """The spread of `score`'s probability: the class's own, else the image's for its top finding.

    Inference may or may not estimate one (it is optional on both values), so it is read
    where present and the measurement is left out where it is not.
    """
    value = getattr(score, "uncertainty", None)
    top = prediction.top_finding
    if value is None and top is not None and top.name == score.name:
        value = getattr(prediction, "uncertainty", None)
    if value is None or not np.isfinite(value):
        return None
    return round(float(value), 4)


def _hot_spot_region(image: tuple[str, int | None], fields: Mapping[str, Any]) -> hd.sr.ImageRegion:
    """The heat map's hot spot as a closed POLYLINE on the source image (TID 1410)."""
    sop_class, frame = image
    return hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=np.asarray(fields["outline"]),
        source_image=hd.sr.SourceImageForRegion(
            referenced_sop_class_uid=sop_class,
            referenced_sop_instance_uid=fields["sop_instance_uid"],
            referenced_frame_numbers=None if frame is None else [frame],
        ),
    )


def _not_evaluated_group(
    context: ResultContext,
    index: int,
    prediction: ImagePrediction,
    algorithm: hd.sr.AlgorithmIdentification,
) -> ItemSpec:
    values = _source_fields(context, index, "not-evaluated")
    values["reason"] = prediction.reason or "not evaluated"
    image = _image_shape(context.sources[index])

    def build(fields: Mapping[str, Any]) -> Group:
        group = hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=_tracking(fields),
            algorithm_id=algorithm,
            qualitative_evaluations=[
                hd.sr.QualitativeEvaluation(codes.EVALUATION, codes.NOT_EVALUATED)
            ],
            source_images=[_source_reference(image, fields)],
        )
        # highdicom takes coded evaluations only; TID 1501 also allows a TEXT one, which
        # says why. It goes before the source image reference, which highdicom appends last.
        content = group[0].ContentSequence
        content.insert(
            len(content) - 1,
            hd.sr.TextContentItem(
                name=codes.COMMENT,
                value=fields["reason"],
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            ),
        )
        return group

    return ItemSpec(("not-evaluated", image), values, _markers(values), build)
