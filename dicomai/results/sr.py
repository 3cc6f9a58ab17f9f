"""The findings of one model run on one study as a TID 1500 Comprehensive 3D SR."""

from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.sr.codedict import codes as dcm_codes
from pydicom.uid import ExplicitVRLittleEndian

from dicomai.inference.types import ClassScore, ImagePrediction
from dicomai.results import codes
from dicomai.results.context import ModelIdentity, ResultContext
from dicomai.results.hotspot import hot_spot_outline

SR_SERIES_NUMBER = 9001
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


def build_sr(context: ResultContext) -> Dataset:
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

    Returns
    -------
    pydicom.Dataset
        The SR, in Explicit VR Little Endian, with UIDs derived from `context`, so that
        building it again from the same context gives the same object.

    Raises
    ------
    ValueError
        If `context` holds no sources, or not one prediction per source.
    """
    _check_context(context)
    root = _measurement_report(context, _measurement_groups(context))[0]
    document = hd.sr.Comprehensive3DSR(
        evidence=_evidence(context),
        content=_shell(root),
        series_instance_uid=context.uid("sr-series"),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=context.uid("sr"),
        instance_number=1,
        manufacturer=codes.MANUFACTURER,
        is_complete=True,
        series_description=codes.series_description("AI findings", context.model),
        software_versions=context.model.software_version,
        contributing_equipment=[codes.model_equipment(context.model, context.device_uid)],
        previous_versions=_predecessors(context),
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )
    document.ContentSequence = root.ContentSequence
    return _plain(document)


def _evidence(context: ResultContext) -> list[Dataset]:
    """The sources as highdicom's evidence: the first in full, for its patient and study.

    highdicom reads only the four UIDs of the others (for the Current Requested Procedure
    Evidence Sequence), so they are not copied whole.
    """
    evidence = [codes.source_header(context.sources[0].dataset)]
    for source in context.sources[1:]:
        reference = Dataset()
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID", "SOPInstanceUID"):
            setattr(reference, keyword, source.dataset[keyword].value)
        evidence.append(reference)
    return evidence


def _shell(root: Dataset) -> Dataset:
    """The report's root container with its first child only, for highdicom's SR constructor.

    The constructor deep-copies and re-parses the content it is given and searches it for
    every image reference; for a 100-image study that took 6 of the SR's 10 s (bench/RESULTS.md,
    End-to-end latency). The tree is already built by highdicom's TID 1500 classes, and every
    reference in it is to a source that the evidence lists, so the document is made around
    this shell and given the whole tree after.
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


def _measurement_report(context: ResultContext, groups: list[Group]) -> hd.sr.MeasurementReport:
    """TID 1500 with an image library entry (TID 1601) of every source.

    The entries describe the image geometry (TID 1603/1604) where a source has it; when one
    lacks it (ImagerPixelSpacing is only Type 3 in a CR image), each source is described by
    what it has instead of failing the whole SR.
    """
    datasets = [source.dataset for source in context.sources]
    try:
        return _report(context, groups, datasets)
    except (AttributeError, IndexError, TypeError):
        return _report(context, groups, [_library_entry(dataset) for dataset in datasets])


def _report(
    context: ResultContext, groups: list[Group], library: list[Dataset]
) -> hd.sr.MeasurementReport:
    return hd.sr.MeasurementReport(
        observation_context=_observation_context(context),
        procedure_reported=codes.IMAGING_PROCEDURE,
        imaging_measurements=groups,
        referenced_images=library,
    )


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


def _library_entry(header: Dataset) -> Dataset:
    """The dataset that the image library describes `header` from.

    TID 1603/1604 descriptors need the image geometry (ImagerPixelSpacing is only Type 3 in
    a CR image); without it the entry keeps modality, rows and columns, not the whole SR.
    """
    try:
        hd.sr.ImageLibraryEntryDescriptors(header)
    except (AttributeError, IndexError, TypeError):
        reduced = Dataset()
        for keyword in ("SOPClassUID", "SOPInstanceUID", "Rows", "Columns"):
            setattr(reduced, keyword, header[keyword].value)
        reduced.Modality = ""
        return reduced
    return header


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
    return hd.sr.AlgorithmIdentification(
        name=model.name,
        version=model.version,
        parameters=[f"architecture={model.architecture}", f"weights_sha256={model.weights_sha256}"],
        manufacturer=model.manufacturer,
    )


Group = (
    hd.sr.MeasurementsAndQualitativeEvaluations
    | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
)


def _measurement_groups(context: ResultContext) -> list[Group]:
    # One TID 4019 subtree serves every group: its items are only read after this, and
    # building it per group was an eighth of the groups' time.
    algorithm = _algorithm(context.model)
    groups: list[Group] = []
    for index, (source, prediction) in enumerate(
        zip(context.sources, context.predictions, strict=True)
    ):
        image = _source_reference(source.dataset)
        if not prediction.evaluated:
            groups.append(_not_evaluated_group(context, index, prediction, image, algorithm))
            continue
        for score in prediction.scores:
            groups.append(_finding_group(context, index, prediction, score, image, algorithm))
    return groups


def _source_reference(dataset: Dataset) -> hd.sr.SourceImageForMeasurementGroup:
    # The model saw the first frame of a multi-frame source (see SourceImage.display).
    frames = [1] if int(dataset.get("NumberOfFrames", 1) or 1) > 1 else None
    return hd.sr.SourceImageForMeasurementGroup(
        referenced_sop_class_uid=dataset.SOPClassUID,
        referenced_sop_instance_uid=dataset.SOPInstanceUID,
        referenced_frame_numbers=frames,
    )


def _finding_group(
    context: ResultContext,
    index: int,
    prediction: ImagePrediction,
    score: ClassScore,
    image: hd.sr.SourceImageForMeasurementGroup,
    algorithm: hd.sr.AlgorithmIdentification,
) -> Group:
    sop_uid = image.referenced_sop_instance_uid
    evaluations = None
    if score.is_finding:
        present = codes.PRESENT if score.positive else codes.ABSENT
        evaluations = [hd.sr.QualitativeEvaluation(codes.coded(score.code), present)]
    tracking = hd.sr.TrackingIdentifier(
        uid=context.uid("tracking", f"{sop_uid}:{score.name}"),
        identifier=f"finding {score.name} image {index + 1}",
    )
    heatmap = prediction.heatmap
    if score.positive and prediction.explained == score.name and heatmap is not None:
        return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking,
            referenced_region=_hot_spot_region(context.sources[index].dataset, heatmap),
            finding_type=codes.coded(score.code),
            algorithm_id=algorithm,
            measurements=_measurements(prediction, score),
            qualitative_evaluations=evaluations,
        )
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        finding_type=codes.coded(score.code),
        algorithm_id=algorithm,
        measurements=_measurements(prediction, score),
        qualitative_evaluations=evaluations,
        source_images=[image],
    )


def _measurements(prediction: ImagePrediction, score: ClassScore) -> list[hd.sr.Measurement]:
    # Four decimals: more than calibration supports, and a DS of at most 16 characters.
    measurements = [
        hd.sr.Measurement(
            name=codes.PROBABILITY, value=round(float(score.probability), 4), unit=codes.NO_UNITS
        )
    ]
    uncertainty = _uncertainty(prediction, score)
    if uncertainty is not None:
        measurements.append(
            hd.sr.Measurement(name=codes.UNCERTAINTY, value=uncertainty, unit=codes.NO_UNITS)
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


def _hot_spot_region(dataset: Dataset, heatmap: np.ndarray) -> hd.sr.ImageRegion:
    """The heat map's hot spot as a closed POLYLINE on the source image (TID 1410)."""
    frames = [1] if int(dataset.get("NumberOfFrames", 1) or 1) > 1 else None
    return hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=hot_spot_outline(heatmap, int(dataset.Rows), int(dataset.Columns)),
        source_image=hd.sr.SourceImageForRegion(
            referenced_sop_class_uid=dataset.SOPClassUID,
            referenced_sop_instance_uid=dataset.SOPInstanceUID,
            referenced_frame_numbers=frames,
        ),
    )


def _not_evaluated_group(
    context: ResultContext,
    index: int,
    prediction: ImagePrediction,
    image: hd.sr.SourceImageForMeasurementGroup,
    algorithm: hd.sr.AlgorithmIdentification,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    sop_uid = image.referenced_sop_instance_uid
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=context.uid("tracking", f"{sop_uid}:not-evaluated"),
            identifier=f"image {index + 1} not evaluated",
        ),
        algorithm_id=algorithm,
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(codes.EVALUATION, codes.NOT_EVALUATED)
        ],
        source_images=[image],
    )
    # highdicom takes coded evaluations only; TID 1501 also allows a TEXT one, which says why.
    # It goes before the source image reference, which highdicom appends last.
    content = group[0].ContentSequence
    content.insert(
        len(content) - 1,
        hd.sr.TextContentItem(
            name=codes.COMMENT,
            value=prediction.reason or "not evaluated",
            relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
        ),
    )
    return group
