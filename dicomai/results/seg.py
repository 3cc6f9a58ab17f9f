"""A multi-task model's lesion mask on one source image, as a DICOM Segmentation."""

from __future__ import annotations

import cv2
import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from dicomai.inference.types import ClassScore, ImagePrediction
from dicomai.results import codes
from dicomai.results.context import ResultContext

SEG_SERIES_NUMBER = 9003
MASK_KEY = "segmentation"
# A pixel belongs to the lesion where the model's mask probability reaches one half.
MASK_THRESHOLD = 0.5


def has_mask(context: ResultContext, index: int) -> bool:
    """Whether ``context.sources[index]`` gets a Segmentation of its lesion mask.

    It needs a mask, a finding the SR reports Present to label it with (a mask the model
    drew on an image it calls negative would be sent as a segmented finding the report
    denies), and a single-frame source: the model saw frame 1 only, and highdicom cannot
    reference one frame of a multi-frame source (without a frame of reference it takes
    single frames only; with one it wants the source's per-frame functional groups).
    """
    prediction = context.predictions[index]
    maps = prediction.extra_maps or {}
    source = context.sources[index].dataset
    return (
        prediction.evaluated
        and maps.get(MASK_KEY) is not None
        and segmented_finding(prediction) is not None
        and int(source.get("NumberOfFrames", 1) or 1) == 1
    )


def segmented_finding(prediction: ImagePrediction) -> ClassScore | None:
    """The finding class a mask is labelled with: positive, or None.

    The explained class where it is positive (the heat map and the overlay show it), else
    the most probable positive finding; None where the image has no positive finding.
    """
    explained = next((s for s in prediction.scores if s.name == prediction.explained), None)
    if explained is not None and explained.positive:
        return explained
    top = prediction.top_finding
    return top if top is not None and top.positive else None


def build_seg(context: ResultContext, index: int) -> Dataset:
    """Build the Segmentation of the lesion mask the model drew on ``context.sources[index]``.

    The mask, a probability map at the model's input resolution, is scaled to the source's
    rows and columns and thresholded at ``MASK_THRESHOLD`` into one BINARY segment: the
    finding class the image was explained for (else its top finding), segmented
    automatically by the model (its name, version and parameters in the segment's
    algorithm identification). An empty mask still gives a Segmentation, one that says the
    model marked nothing.

    Parameters
    ----------
    context
        Sources, predictions and model identity.
    index
        Which source; `has_mask` must hold for it.

    Returns
    -------
    pydicom.Dataset
        A Segmentation in a new series of the source's study, with UIDs derived from
        `context`, in Explicit VR Little Endian.

    Raises
    ------
    ValueError
        If the prediction has no 2-D mask or no positive finding class to name the segment
        after, or the source has several frames.
    """
    source = context.sources[index].dataset
    prediction = context.predictions[index]
    score = segmented_finding(prediction)
    if score is None or not has_mask(context, index):
        raise ValueError(
            f"source image {index + 1} has no segmentation mask of a positive finding"
            " on a single frame"
        )
    mask = np.asarray((prediction.extra_maps or {})[MASK_KEY], dtype=np.float32)
    if mask.ndim != 2:
        raise ValueError(f"segmentation mask must be 2-D, not {mask.shape}")
    header = codes.source_header(source)
    seg = hd.seg.Segmentation(
        source_images=[header],
        pixel_array=_binary(mask, int(source.Rows), int(source.Columns)),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[
            hd.seg.SegmentDescription(
                segment_number=1,
                segment_label=score.name[:64],
                segmented_property_category=codes.ABNORMAL_STRUCTURE,
                segmented_property_type=codes.coded(score.code),
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=_algorithm(context),
                tracking_uid=context.tracking_uid(str(source.SOPInstanceUID), score.name),
                tracking_id=f"finding {score.name} image {index + 1}",
            )
        ],
        series_instance_uid=context.uid("seg-series"),
        series_number=context.series_number(SEG_SERIES_NUMBER),
        sop_instance_uid=context.uid("seg", str(source.SOPInstanceUID)),
        instance_number=index + 1,
        manufacturer=codes.MANUFACTURER,
        manufacturer_model_name=codes.model_label(context.model)[:64],
        software_versions=context.model.software_version,
        device_serial_number=context.device_uid,
        omit_empty_frames=False,
        series_description=codes.series_description(
            context.series_title("AI segmentation"), context.model, " - " + codes.NOT_FOR_DIAGNOSIS
        ),
        contributing_equipment=[codes.model_equipment(context.model, context.device_uid)],
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )
    seg.copy_patient_and_study_information(header)
    if "FrameOfReferenceUID" not in header:
        # PS3.3 C.7.6.1: an image without a patient frame of reference says how it lies.
        seg.PatientOrientation = codes.patient_orientation(header)
    return seg


def _binary(mask: np.ndarray, rows: int, columns: int) -> np.ndarray:
    scaled = cv2.resize(np.nan_to_num(mask), (columns, rows), interpolation=cv2.INTER_LINEAR)
    return (scaled >= MASK_THRESHOLD)[np.newaxis]


def _algorithm(context: ResultContext) -> hd.AlgorithmIdentificationSequence:
    model = context.model
    return hd.AlgorithmIdentificationSequence(
        name=model.name,
        family=codes.ARTIFICIAL_INTELLIGENCE,
        version=model.version,
        source=model.manufacturer,
        parameters={"architecture": model.architecture, "weights_sha256": model.weights_sha256},
    )
