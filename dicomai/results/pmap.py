"""The Grad-CAM heat map of one source image as a DICOM Parametric Map."""

from __future__ import annotations

import cv2
import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import ExplicitVRLittleEndian

from dicomai.results import codes
from dicomai.results.context import ResultContext
from dicomai.results.sc import heat_strength

PMAP_SERIES_NUMBER = 9004
# PS3.3 C.7.6.2: a Parametric Map lies in the patient's frame of reference; a source must say
# where its pixels are in it (projection radiographs, CR and DX, do not).
# Each with the number of values highdicom reads (0: one value), Slice Thickness included: it
# copies the source's pixel measures.
_GEOMETRY = {
    "FrameOfReferenceUID": 0,
    "ImagePositionPatient": 3,
    "ImageOrientationPatient": 6,
    "PixelSpacing": 2,
    "SliceThickness": 0,
}
_HEAT_LABEL = "GRADCAM"


def supports_pmap(context: ResultContext, index: int) -> bool:
    """Whether ``context.sources[index]`` can carry a Parametric Map of its heat map.

    It needs a heat map and a single-frame source placed in the patient's frame of
    reference (CT, MR, PET: the geometry highdicom copies into the map).
    """
    prediction = context.predictions[index]
    source = context.sources[index].dataset
    return (
        prediction.evaluated
        and prediction.heatmap is not None
        and all(_has(source, keyword, count) for keyword, count in _GEOMETRY.items())
        and int(source.get("NumberOfFrames", 1) or 1) == 1
    )


def _has(source: Dataset, keyword: str, count: int) -> bool:
    value = source.get(keyword)
    if value is None or value == "":
        return False
    return count == 0 or (isinstance(value, MultiValue | list) and len(value) == count)


def build_heatmap_pmap(context: ResultContext, index: int) -> Dataset:
    """Build the Parametric Map of the heat map of ``context.sources[index]``.

    The values are the heat map the overlay shows, scaled to the source's rows and columns:
    the Grad-CAM map in [0, 1] times the overlay's strength (full at or above the decision
    threshold, fading below it), as 32-bit floats with a unitless real-world value mapping.

    Parameters
    ----------
    context
        Sources, predictions and model identity.
    index
        Which source; `supports_pmap` must hold for it.

    Returns
    -------
    pydicom.Dataset
        A Parametric Map in a new series of the source's study, with UIDs derived from
        `context`, in Explicit VR Little Endian.

    Raises
    ------
    ValueError
        If the source has no heat map or lies in no patient frame of reference.
    """
    source = context.sources[index].dataset
    prediction = context.predictions[index]
    if prediction.heatmap is None or not supports_pmap(context, index):
        raise ValueError(
            f"source image {index + 1} has no heat map or no patient geometry for a map"
        )
    header = codes.source_header(source)
    rows, columns = int(source.Rows), int(source.Columns)
    heat = cv2.resize(
        np.nan_to_num(prediction.heatmap.astype(np.float32)),
        (columns, rows),
        interpolation=cv2.INTER_LINEAR,
    )
    heat = np.clip(heat, 0.0, 1.0) * np.float32(heat_strength(prediction))
    pmap = hd.pm.ParametricMap(
        source_images=[header],
        pixel_array=heat[np.newaxis],
        series_instance_uid=context.uid("pmap-series"),
        series_number=context.series_number(PMAP_SERIES_NUMBER),
        sop_instance_uid=context.uid("pmap", str(source.SOPInstanceUID)),
        instance_number=index + 1,
        manufacturer=codes.MANUFACTURER,
        manufacturer_model_name=codes.model_label(context.model)[:64],
        software_versions=context.model.software_version,
        device_serial_number=context.device_uid,
        contains_recognizable_visual_features=False,
        real_world_value_mappings=[
            _mapping(prediction.explained or "finding", codes.method_label(context.model))
        ],
        voi_lut_transformations=[hd.VOILUTTransformation(window_center=0.5, window_width=1.0)],
        content_label=_HEAT_LABEL,
        content_description=(
            f"{codes.method_label(context.model)} heat map ({prediction.explained})"[:64]
        ),
        series_description=codes.series_description(
            context.series_title("AI heat map values"),
            context.model,
            " - " + codes.NOT_FOR_DIAGNOSIS,
        ),
        contributing_equipment=[codes.model_equipment(context.model, context.device_uid)],
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )
    pmap.copy_patient_and_study_information(header)
    series = [
        context.sources[i].dataset for i in range(len(context.sources)) if supports_pmap(context, i)
    ]
    for keyword, value in codes.series_body_part(series).items():
        setattr(pmap, keyword, value)
    return pmap


def _mapping(explained: str, method: str) -> hd.pm.RealWorldValueMapping:
    return hd.pm.RealWorldValueMapping(
        lut_label=_HEAT_LABEL,
        lut_explanation=f"{method} weight for {explained}"[:64],
        unit=codes.NO_UNITS,
        value_range=(0.0, 1.0),
        slope=1,
        intercept=0,
    )
