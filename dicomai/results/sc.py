"""A source image with the model's heat map blended over it, as an RGB Secondary Capture."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import cv2
import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.tag import Tag
from pydicom.uid import UID, ExplicitVRLittleEndian

from dicomai.inference.types import ImagePrediction
from dicomai.results import codes
from dicomai.results.context import ResultContext, SourceImage

SC_SERIES_NUMBER = 9002
# Longest side of the overlay: at most 1024 keeps an object near 3 MB; at least 512 leaves the
# caption, which spans the image width, large enough to read on a small source (a 64² MR).
MAX_SIDE = 1024
MIN_SIDE = 512
MIN_CAPTION_WIDTH = 384
# Opacity of the heat map where it is hottest; it falls with the heat, so the anatomy the
# model did not look at stays as the source shows it.
MAX_ALPHA = 0.5
MAX_FONT_SCALE = 1.5
# Source pixels whose height and width differ by less than this fraction count as square:
# resampling them would change the overlay's size by a pixel or two, invisibly.
ASPECT_TOLERANCE = 0.01
# A stated aspect beyond this (a Pixel Aspect Ratio of 1\1000) is taken as a header error,
# and the pixels as square: resampled by it, the overlay would be a line.
MAX_ASPECT = 10.0
DISCLAIMER = "AI generated - " + codes.NOT_FOR_DIAGNOSIS
# PS3.16 CID 7202: why the SC references its source.
_SOURCE_PURPOSE = hd.sr.CodedConcept("121322", "DCM", "Source image for image processing operation")
_FONT = cv2.FONT_HERSHEY_SIMPLEX


def build_sc(context: ResultContext, index: int) -> Dataset:
    """Build the heat-map overlay of ``context.sources[index]`` as a Secondary Capture.

    The pixels are the source's display image, resampled to square pixels (see
    `pixel_aspect`) and scaled so that its longest side lies between 512 and 1024, with the
    heat map blended over it and a caption band below it that names the finding, its
    probability, the model and the report (its number and time), and says it is not for
    primary diagnosis.
    For several overlays of one context, `OverlayBuilder` builds them faster.

    Parameters
    ----------
    context
        Sources, predictions and model identity.
    index
        Which source to render; ``context.predictions[index]`` must carry a heat map.

    Returns
    -------
    pydicom.Dataset
        An RGB SC image (ImageType DERIVED\\SECONDARY, burned-in annotation) in a new series
        of the source's study, in Explicit VR Little Endian, with UIDs derived from `context`.

    Raises
    ------
    ValueError
        If the prediction has no heat map (the image was not evaluated): callers build
        overlays only for predictions with ``evaluated`` and a ``heatmap``.
    """
    return OverlayBuilder(context).build(index)


class OverlayBuilder:
    """Builds the overlays of one context, highdicom's SC once and its copies for the rest.

    highdicom builds the first overlay, taking the patient and study from that source
    (its `from_ref_dataset` accepts any instance of the study, so one serves all); the
    others are copies of it with their own pixels, UIDs and description of their source
    (`_PER_IMAGE`). That skips highdicom's checks of every attribute against the IOD for
    each of a study's overlays: about 9 ms of 20 for a 512² overlay.
    """

    def __init__(self, context: ResultContext) -> None:
        self.context = context
        self._first: Dataset | None = None
        self._first_patient: tuple[str, ...] = ()
        self._series = codes.series_body_part(
            [
                source.dataset
                for source, prediction in zip(context.sources, context.predictions, strict=True)
                if prediction.evaluated and prediction.heatmap is not None
            ]
        )

    def build(self, index: int) -> Dataset:
        """The overlay of ``context.sources[index]``, as `build_sc` describes it."""
        context = self.context
        source = context.sources[index]
        lines = caption_lines(context, index)
        pixels = render_overlay(
            source.display, _heatmap(context, index), lines, pixel_aspect(source.dataset)
        )
        uid = context.uid("sc", str(source.dataset.SOPInstanceUID))
        patient = _patient_of(source.dataset)
        if self._first is None or patient != self._first_patient:
            # A study whose images name two patients (a mis-filed image): each overlay carries
            # its own image's patient, never a copy of the first's.
            header = codes.source_header(source.dataset)
            sc = _highdicom_sc(context, header, pixels, uid, index + 1)
            if self._first is None:
                self._first, self._first_patient = sc, patient
        else:
            # Only highdicom needs a copy of the header; the derivation reads the source.
            sc = _copy_for_image(self._first, pixels, uid, index + 1)
        finding = finding_label(context, index)
        _describe_derivation(sc, source, codes.method_label(context.model), finding, lines)
        for keyword, value in self._series.items():
            setattr(sc, keyword, value)
        return sc


# What the copies take from the first overlay of a patient and study (PS3.3 C.7.1.1, C.7.2.1).
_PATIENT_KEYWORDS = (
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyID",
    "AccessionNumber",
)


def _patient_of(dataset: Dataset) -> tuple[str, ...]:
    return tuple(str(dataset.get(keyword, "")) for keyword in _PATIENT_KEYWORDS)


def _highdicom_sc(
    context: ResultContext, header: Dataset, pixels: np.ndarray, uid: str, number: int
) -> Dataset:
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=header,
        pixel_array=pixels,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        # highdicom takes single letters only; the real value is set by _describe_derivation.
        patient_orientation=("L", "P"),
        series_instance_uid=context.uid("sc-series"),
        series_number=context.series_number(SC_SERIES_NUMBER),
        sop_instance_uid=uid,
        instance_number=number,
        manufacturer=codes.MANUFACTURER,
        transfer_syntax_uid=ExplicitVRLittleEndian,
        contributing_equipment=[codes.model_equipment(context.model, context.device_uid)],
        series_description=codes.series_description(
            context.series_title("AI heat map"), context.model, " - " + codes.NOT_FOR_DIAGNOSIS
        ),
        software_versions=context.model.software_version,
        content_date=context.created.date(),
        content_time=context.created.time(),
    )
    sc.copy_patient_and_study_information(header)
    return sc


# What differs between the overlays of one study: the image, its identity, and what
# `_describe_derivation` says of its source. Everything else is the study's or the model's.
_PER_IMAGE = (
    "ImageType",
    "BurnedInAnnotation",
    "ConversionType",
    "SOPInstanceUID",
    "InstanceNumber",
    "Rows",
    "Columns",
    "PixelData",
    "PatientOrientation",
    "BodyPartExamined",
    "Laterality",
    "DerivationDescription",
    "SourceImageSequence",
    "LossyImageCompression",
)


def _copy_for_image(first: Dataset, pixels: np.ndarray, uid: str, number: int) -> Dataset:
    """A copy of the first overlay with another image.

    The copy shares the first's elements, none of which may change: each value that differs
    gets a new element (removed, then set), never a new value in the shared one.
    """
    sc = Dataset({tag: element for tag, element in first.items()})
    for keyword in _PER_IMAGE:
        sc.pop(keyword, None)
    meta = {tag: element for tag, element in first.file_meta.items()}
    meta.pop(Tag("MediaStorageSOPInstanceUID"))
    sc.file_meta = FileMetaDataset(meta)
    sc.file_meta.MediaStorageSOPInstanceUID = UID(uid)
    sc.SOPInstanceUID = uid
    sc.InstanceNumber = number
    sc.Rows, sc.Columns = pixels.shape[:2]
    sc.PixelData = np.ascontiguousarray(pixels).tobytes()
    return sc


def caption_lines(context: ResultContext, index: int) -> tuple[str, str, str, str]:
    """Return the caption of the overlay of ``context.sources[index]``.

    Only the finding, the model, the report and a disclaimer: nothing from the source's
    header, so no patient data can be burned into the pixels.

    Parameters
    ----------
    context
        Sources, predictions and model identity.
    index
        Which source.

    Returns
    -------
    tuple of str
        `finding_label` ("<finding>: <probability %>"), followed for a source of several
        frames by ", " and `frame_label` ("Nodule: 87%, frame 6 of 8"); "<model name>
        <version>", `report_label` and the disclaimer.

    Raises
    ------
    ValueError
        If the prediction has no heat map or does not say which class it explains.
    """
    finding = finding_label(context, index)
    frame = frame_label(context.sources[index])
    if frame is not None:
        # On the finding's line, the shortest: "Nodule: >99%, frame 120 of 120" is still
        # narrower than the disclaimer, the line the font size is fitted to, and a line of its
        # own would make the band taller.
        finding = f"{finding}, {frame}"
    # The report on a line of its own: one font size serves all lines, fitted to the longest,
    # and on the model's line it had made every line a third smaller.
    return finding, codes.model_label(context.model), report_label(context), DISCLAIMER


def finding_label(context: ResultContext, index: int) -> str:
    """The finding the overlay of ``context.sources[index]`` explains, with its probability:
    "Nodule: 87%" (">99%" and "<1%" at the ends, see `codes.shown_percent`).

    Raises
    ------
    ValueError
        If the prediction has no heat map or does not say which class it explains.
    """
    _heatmap(context, index)
    prediction = context.predictions[index]
    if prediction.explained is None:
        raise ValueError(f"source image {index + 1} has a heat map but no explained class")
    score = prediction.score(prediction.explained)
    return f"{score.code.meaning}: {codes.shown_percent(score)}"


def frame_label(image: SourceImage) -> str | None:
    """Which frame of a multi-frame source an overlay shows, "frame 6 of 8"; None for a
    source of one frame.

    A radiologist who opens a cine or an XA run finds it on its first frame: without the
    frame, a heat map on frame 6 matched nothing there, and only a header dump named it.
    """
    frames = int(image.dataset.get("NumberOfFrames", 1) or 1)
    return f"frame {image.frame + 1} of {frames}" if frames > 1 else None


def report_label(context: ResultContext) -> str:
    """Which report an overlay belongs to: "report #3, 2026-11-25 02:04".

    Superseded overlays stay in the PACS beside the new ones, and a hanging protocol or a
    thumbnail view hides the Series Description that numbers them: the image itself says
    which report, of when, it is of. The time is the SR's Content Date and Time, to the
    minute; ASCII, as all text dicomai generates.
    """
    return f"report #{context.revision}, {context.created:%Y-%m-%d %H:%M}"


def render_overlay(
    display: np.ndarray, heatmap: np.ndarray, lines: Sequence[str], aspect: float = 1.0
) -> np.ndarray:
    """Compose the pixels of an overlay: the scaled display, the heat map, the caption below.

    Parameters
    ----------
    display
        uint8 grayscale source image (rows, columns) at the source resolution.
    heatmap
        float heat map in [0, 1] at the model's input resolution.
    lines
        Caption lines, see `caption_lines`.
    aspect
        Height of a display pixel over its width, see `pixel_aspect`.

    Returns
    -------
    numpy.ndarray
        uint8 RGB (rows + caption height, columns, 3), where the display was resampled to
        square pixels and scaled so that its longest side lies between ``MIN_SIDE`` and
        ``MAX_SIDE``, and a display narrower than ``MIN_CAPTION_WIDTH`` has black margins
        left and right: the caption below is as wide as the image, and a 3000 x 400
        source's was a few pixels high.
    """
    image = blend_heatmap(_fit_display(display, aspect), heatmap)
    short = MIN_CAPTION_WIDTH - image.shape[1]
    if short > 0:
        image = cv2.copyMakeBorder(
            image, 0, 0, short // 2, short - short // 2, cv2.BORDER_CONSTANT, value=(0, 0, 0)
        )
    return np.vstack([image, render_caption(lines, image.shape[1])])


def blend_heatmap(display: np.ndarray, heatmap: np.ndarray) -> np.ndarray:
    """Blend a heat map, coloured with the JET map, over a grayscale image.

    Parameters
    ----------
    display
        uint8 grayscale image (rows, columns).
    heatmap
        float heat map in [0, 1] of any size; it is resized to the size of `display`.

    Returns
    -------
    numpy.ndarray
        uint8 RGB image (rows, columns, 3). Each pixel's heat-map opacity is
        ``MAX_ALPHA * heat``, so cold regions keep their gray value.

    Raises
    ------
    ValueError
        If `display` is not a 2-D uint8 array or `heatmap` is not 2-D.
    """
    if display.ndim != 2 or display.dtype != np.uint8:
        raise ValueError(f"display must be 2-D uint8, not {display.dtype} {display.shape}")
    if heatmap.ndim != 2:
        raise ValueError(f"heat map must be 2-D, not {heatmap.shape}")
    rows, columns = display.shape
    heat = cv2.resize(
        np.nan_to_num(heatmap.astype(np.float32)), (columns, rows), interpolation=cv2.INTER_LINEAR
    )
    heat = np.clip(heat, 0.0, 1.0)
    colours = cv2.applyColorMap(np.rint(heat * 255).astype(np.uint8), cv2.COLORMAP_JET)
    blended = cv2.cvtColor(colours, cv2.COLOR_BGR2RGB).astype(np.float32)
    alpha = MAX_ALPHA * heat
    # The gray is the same in the three channels: weighed once and blended in place, a 512²
    # overlay takes a quarter less time than with three-channel temporaries, to the same bit.
    gray = (1.0 - alpha) * display.astype(np.float32)
    blended *= alpha[..., np.newaxis]
    blended += gray[..., np.newaxis]
    return np.rint(blended, out=blended).astype(np.uint8)


def render_caption(lines: Sequence[str], width: int) -> np.ndarray:
    """Render lines of white text on a black band of the given width.

    The font scale is the largest (up to ``MAX_FONT_SCALE``) at which the longest line fits;
    characters outside ASCII, which the Hershey fonts lack, are drawn as "?".

    Parameters
    ----------
    lines
        Text lines, top to bottom.
    width
        Band width in pixels, the width of the image the band goes under.

    Returns
    -------
    numpy.ndarray
        uint8 RGB band (height, width, 3); its height follows from `width` and the lines.
    """
    texts = [line.encode("ascii", "replace").decode("ascii") for line in lines]
    margin = max(4, width // 64)
    thickness = 1 if width < 800 else 2
    widest = max(cv2.getTextSize(text, _FONT, 1.0, thickness)[0][0] for text in texts)
    scale = min(MAX_FONT_SCALE, (width - 2 * margin) / max(widest, 1))
    (_, text_height), baseline = cv2.getTextSize("Ag", _FONT, scale, thickness)
    pitch = text_height + baseline + margin // 2
    band = np.zeros((2 * margin + pitch * len(texts), width, 3), dtype=np.uint8)
    for number, text in enumerate(texts):
        origin = (margin, margin + number * pitch + text_height)
        cv2.putText(band, text, origin, _FONT, scale, (255, 255, 255), thickness, cv2.LINE_AA)
    return band


def _heatmap(context: ResultContext, index: int) -> np.ndarray:
    prediction = context.predictions[index]
    if not prediction.evaluated or prediction.heatmap is None:
        raise ValueError(f"source image {index + 1} was not evaluated: no heat map to show")
    return prediction.heatmap * heat_strength(prediction)


def heat_strength(prediction: ImagePrediction) -> float:
    """How strongly the heat map is drawn: full at or above the decision threshold.

    Grad-CAM normalises every map to [0, 1], so a confident negative would otherwise show
    a full-strength hot spot; below the threshold the map fades with the probability.
    """
    top = prediction.top_finding
    if top is None or top.threshold <= 0:
        return 1.0
    return float(min(1.0, top.probability / top.threshold))


def pixel_aspect(source: Dataset) -> float:
    """Height of a source pixel over its width, 1.0 where unknown or (nearly) square.

    The SC carries neither Pixel Spacing nor Pixel Aspect Ratio (PS3.3 C.7.6.3), so viewers
    show its pixels square: the overlay is resampled by this factor, else a source of
    0.5 x 1.25 mm pixels would show its anatomy squashed 2.5:1. Taken from the source's Pixel
    Spacing (in an enhanced image, that of its shared functional groups), else Imager Pixel
    Spacing (projection radiographs), else Pixel Aspect Ratio; each is row spacing (the
    vertical size) first.
    """
    for pair in _pixel_sizes(source):
        try:
            vertical, horizontal = (float(value) for value in pair)
        except (TypeError, ValueError):
            continue
        if vertical > 0 and horizontal > 0 and np.isfinite(vertical / horizontal):
            aspect = vertical / horizontal
            square = abs(aspect - 1.0) < ASPECT_TOLERANCE
            plausible = 1 / MAX_ASPECT <= aspect <= MAX_ASPECT
            return aspect if plausible and not square else 1.0
    return 1.0


def _pixel_sizes(source: Dataset) -> list[Any]:
    """The source's stated pixel sizes (vertical, horizontal), most trusted first."""
    sizes = [source.get("PixelSpacing")]
    for group in source.get("SharedFunctionalGroupsSequence", [])[:1]:
        for measures in group.get("PixelMeasuresSequence", [])[:1]:
            sizes.append(measures.get("PixelSpacing"))
    sizes += [source.get("ImagerPixelSpacing"), source.get("PixelAspectRatio")]
    return [size for size in sizes if size is not None and not isinstance(size, str)]


def _fitted_size(shape: tuple[int, ...], aspect: float = 1.0) -> tuple[int, int]:
    # The display's height in widths of its pixels: its rows, were its pixels square.
    rows, columns = shape[0] * aspect, shape[1]
    longest = max(rows, columns)
    scale = min(max(1.0, MIN_SIDE / longest), MAX_SIDE / longest)
    return max(1, round(rows * scale)), max(1, round(columns * scale))


def _fit_display(display: np.ndarray, aspect: float = 1.0) -> np.ndarray:
    rows, columns = _fitted_size(display.shape, aspect)
    if (rows, columns) == display.shape:
        return display
    if (rows < display.shape[0]) != (columns < display.shape[1]):
        # One axis shrinks, the other grows: each with its own interpolation, so the shrunk
        # one is averaged (INTER_AREA) rather than sampled.
        display = _resized(display, display.shape[0], columns)
    return _resized(display, rows, columns)


def _resized(display: np.ndarray, rows: int, columns: int) -> np.ndarray:
    if (rows, columns) == display.shape:
        return display
    shrink = rows < display.shape[0] or columns < display.shape[1]
    interpolation = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    return cv2.resize(display, (columns, rows), interpolation=interpolation)


def _describe_derivation(
    sc: Dataset, image: SourceImage, method: str, finding: str, caption: Sequence[str]
) -> None:
    """Set what makes the SC a derived, annotated image of `image` (PS3.3 C.7.6.1, C.8.6).

    The Derivation Description names the finding (`finding_label`), the frame of a
    multi-frame source (`frame_label`), the model and the report as the caption
    (`caption_lines`) does: "Grad-CAM heat map (Nodule: 87%) blended over frame 6 of 8 of
    the source image; demo-chest-nodule 1.0.0 - report #2, 2026-11-25 02:04".
    """
    source = image.dataset
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.BurnedInAnnotation = "YES"
    # PS3.3 C.8.6.1: produced on a workstation, not digitized from an interface or film.
    sc.ConversionType = "WSD"
    sc.PatientOrientation = codes.patient_orientation(source)
    frame = frame_label(image)
    shown = "the source image" if frame is None else f"{frame} of the source image"
    model, report = caption[1], caption[2]
    sc.DerivationDescription = (
        f"{method} heat map ({finding}) blended over {shown}; {model} - {report}"
    )
    reference = Dataset()
    reference.ReferencedSOPClassUID = source.SOPClassUID
    reference.ReferencedSOPInstanceUID = source.SOPInstanceUID
    if codes.referenced_as_multi_frame(source):
        reference.ReferencedFrameNumber = image.frame + 1
    reference.PurposeOfReferenceCodeSequence = [_SOURCE_PURPOSE]
    sc.SourceImageSequence = [reference]
    # PS3.3 C.7.6.1.1.5: an image derived from a lossy compressed one stays marked lossy.
    if source.get("LossyImageCompression") == "01":
        sc.LossyImageCompression = "01"
