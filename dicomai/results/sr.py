"""The findings of one model run on one study as a TID 1500 Comprehensive 3D SR."""

from __future__ import annotations

import highdicom as hd
from pydicom import Dataset
from pydicom.sr.codedict import codes as dcm_codes
from pydicom.uid import ExplicitVRLittleEndian

from dicomai.inference.types import ClassScore, ImagePrediction
from dicomai.results import codes
from dicomai.results.context import ModelIdentity, ResultContext

SR_SERIES_NUMBER = 9001


def build_sr(context: ResultContext) -> Dataset:
    """Build the Comprehensive 3D SR that reports a model run on a study.

    The content is a TID 1500 Measurement Report observed by the model as a device: an image
    library of every source, and per source image and model class one measurement group with
    the class as finding, its calibrated probability and, for finding classes, Present or
    Absent. A source that was not evaluated gets one group saying so and why.

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
    headers = [codes.source_header(source.dataset) for source in context.sources]
    report = hd.sr.MeasurementReport(
        observation_context=_observation_context(context),
        procedure_reported=codes.IMAGING_PROCEDURE,
        imaging_measurements=_measurement_groups(context),
        referenced_images=[_library_entry(header) for header in headers],
    )
    return hd.sr.Comprehensive3DSR(
        evidence=headers,
        content=report,
        series_instance_uid=context.uid("sr-series"),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=context.uid("sr"),
        instance_number=1,
        manufacturer=codes.MANUFACTURER,
        is_complete=True,
        series_description=codes.series_description("AI findings", context.model),
        software_versions=context.model.software_version,
        contributing_equipment=[codes.model_equipment(context.model)],
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )


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
        uid=context.uid("device"),
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


def _measurement_groups(
    context: ResultContext,
) -> list[hd.sr.MeasurementsAndQualitativeEvaluations]:
    groups = []
    for index, (source, prediction) in enumerate(
        zip(context.sources, context.predictions, strict=True)
    ):
        image = _source_reference(source.dataset)
        if not prediction.evaluated:
            groups.append(_not_evaluated_group(context, index, prediction, image))
            continue
        for score in prediction.scores:
            groups.append(_finding_group(context, index, score, image))
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
    score: ClassScore,
    image: hd.sr.SourceImageForMeasurementGroup,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    sop_uid = image.referenced_sop_instance_uid
    probability = hd.sr.Measurement(
        name=codes.PROBABILITY,
        # Four decimals: more than calibration supports, and a DS of at most 16 characters.
        value=round(float(score.probability), 4),
        unit=codes.NO_UNITS,
    )
    evaluations = None
    if score.is_finding:
        present = codes.PRESENT if score.positive else codes.ABSENT
        evaluations = [hd.sr.QualitativeEvaluation(codes.coded(score.code), present)]
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=context.uid("tracking", f"{sop_uid}:{score.name}"),
            identifier=f"finding {score.name} image {index + 1}",
        ),
        finding_type=codes.coded(score.code),
        algorithm_id=_algorithm(context.model),
        measurements=[probability],
        qualitative_evaluations=evaluations,
        source_images=[image],
    )


def _not_evaluated_group(
    context: ResultContext,
    index: int,
    prediction: ImagePrediction,
    image: hd.sr.SourceImageForMeasurementGroup,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    sop_uid = image.referenced_sop_instance_uid
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=context.uid("tracking", f"{sop_uid}:not-evaluated"),
            identifier=f"image {index + 1} not evaluated",
        ),
        algorithm_id=_algorithm(context.model),
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
