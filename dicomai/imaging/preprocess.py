"""Rendering DICOM pixels as a radiologist sees them, and turning them into model input."""

from __future__ import annotations

import math

import cv2
import numpy as np
from pydicom import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi, apply_voi_lut

from dicomai.errors import NotEvaluable
from dicomai.imaging.decode import frame_count, pixel_frames
from dicomai.imaging.spec import Equalization, FrameSelection, InputSpec

# The attributes of the Modality LUT and VOI LUT modules (PS3.3 C.11.1, C.11.2), which
# enhanced multi-frame IODs move into functional groups (PS3.3 C.7.6.16.2.9, C.7.6.16.2.10).
_LUT_KEYWORDS = (
    "PhotometricInterpretation",
    "BitsStored",
    "PixelRepresentation",
    "RescaleSlope",
    "RescaleIntercept",
    "RescaleType",
    "ModalityLUTSequence",
    "WindowCenter",
    "WindowWidth",
    "VOILUTFunction",
    "VOILUTSequence",
)
_FRAME_LUT_SEQUENCES = ("PixelValueTransformationSequence", "FrameVOILUTSequence")

# ITU-R BT.601 luma, the weights cv2.COLOR_RGB2GRAY uses.
_LUMA = np.array([0.299, 0.587, 0.114])

# Windows that pydicom cannot apply (width < 1, unknown VOI LUT Function...) raise these;
# a viewer ignores such a window, and so do we.
_INVALID_WINDOW = (
    ValueError,
    TypeError,
    IndexError,
    KeyError,
    AttributeError,
    NotImplementedError,
)


def render(ds: Dataset, frame: int = 0) -> np.ndarray:
    """Render one frame as a radiologist's viewer displays it.

    Monochrome images go through the modality LUT, then the VOI LUT or the first window
    (without either: the data's range, or its 0.5-99.5 percentiles for CT), and MONOCHROME1
    is inverted so that bright always means dense. Colour and palette images become their
    luminance.

    Parameters
    ----------
    ds : pydicom.Dataset
        The instance.
    frame : int
        Zero-based frame index.

    Returns
    -------
    numpy.ndarray
        ``float32`` array of shape ``(rows, cols)`` with values in [0, 1]; a constant image
        renders as zeros.

    Raises
    ------
    dicomai.errors.NotEvaluable
        If the pixels cannot be decoded or the LUTs cannot be applied.
    """
    stored = pixel_frames(ds, index=frame)[0]
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if stored.ndim == 3:
        bits = min(int(ds.get("BitsStored", 8 * stored.itemsize)), 8 * stored.itemsize)
        return _luminance(stored, 2**bits - 1)
    if photometric == "PALETTE COLOR":
        try:
            rgb = apply_color_lut(stored, ds)
        except (ValueError, KeyError, AttributeError, IndexError) as exc:
            raise NotEvaluable("invalid palette colour lookup table") from exc
        return _luminance(rgb, np.iinfo(rgb.dtype).max)
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise NotEvaluable(f"unsupported Photometric Interpretation {photometric[:16]!r}")
    return _render_monochrome(stored, ds, frame, inverted=photometric == "MONOCHROME1")


def modality_values(ds: Dataset, frame: int = 0) -> np.ndarray:
    """Return one frame of a monochrome image in modality units (Hounsfield units for CT).

    Parameters
    ----------
    ds : pydicom.Dataset
        The instance.
    frame : int
        Zero-based frame index.

    Returns
    -------
    numpy.ndarray
        ``float64`` array of shape ``(rows, cols)``.

    Raises
    ------
    dicomai.errors.NotEvaluable
        If the pixels cannot be decoded or the modality LUT cannot be applied.
    """
    stored = pixel_frames(ds, index=frame)[0]
    if stored.ndim != 2:
        raise NotEvaluable("modality values exist for single-sample images only")
    return _modality(stored, lut_attributes(ds, frame))


def lut_attributes(ds: Dataset, frame: int = 0) -> Dataset:
    """Collect the Modality and VOI LUT attributes that apply to one frame.

    Top-level attributes are overridden by the shared, then the per-frame functional groups
    of enhanced multi-frame instances.

    Parameters
    ----------
    ds : pydicom.Dataset
        The instance.
    frame : int
        Zero-based frame index.

    Returns
    -------
    pydicom.Dataset
        A small dataset holding only those attributes (and the source's encoding, which
        pydicom needs to read OW lookup tables).
    """
    attrs = Dataset()
    for keyword in _LUT_KEYWORDS:
        if keyword in ds:
            attrs[keyword] = ds[keyword]
    for group in _functional_groups(ds, frame):
        for sequence in _FRAME_LUT_SEQUENCES:
            items = group.get(sequence)
            if not items:
                continue
            for keyword in _LUT_KEYWORDS:
                if keyword in items[0]:
                    attrs[keyword] = items[0][keyword]
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        attrs.file_meta = meta
    attrs.set_original_encoding(*ds.original_encoding)
    return attrs


def to_display(image01: np.ndarray) -> np.ndarray:
    """Quantise a rendered image to 8 bits for display or burning into an overlay.

    Parameters
    ----------
    image01 : numpy.ndarray
        Values in [0, 1], as returned by :func:`render`.

    Returns
    -------
    numpy.ndarray
        ``uint8`` array of the same shape.
    """
    return np.rint(np.clip(image01, 0.0, 1.0) * 255.0).astype(np.uint8)


def to_model_input(image01: np.ndarray, spec: InputSpec) -> np.ndarray:
    """Turn a rendered image into a model's input tensor.

    Parameters
    ----------
    image01 : numpy.ndarray
        ``(rows, cols)`` values in [0, 1], as returned by :func:`render`.
    spec : InputSpec
        Equalisation, output size and normalisation.

    Returns
    -------
    numpy.ndarray
        ``float32`` array of shape ``(3, spec.size[0], spec.size[1])``.
    """
    image = _equalize(image01, spec)
    rows, cols = spec.size
    # INTER_AREA averages the source pixels under each output pixel: no aliasing of fine
    # structure when a 3000-pixel radiograph shrinks to 224.
    resized = cv2.resize(image, (cols, rows), interpolation=cv2.INTER_AREA)
    mean = np.asarray(spec.mean, dtype=np.float32)[:, None, None]
    std = np.asarray(spec.std, dtype=np.float32)[:, None, None]
    return np.ascontiguousarray((resized[None, :, :] - mean) / std, dtype=np.float32)


def prepare(ds: Dataset, spec: InputSpec, frame: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Render one frame for display and for the model.

    Parameters
    ----------
    ds : pydicom.Dataset
        The instance.
    spec : InputSpec
        The model's input specification.
    frame : int
        Zero-based frame index.

    Returns
    -------
    tuple of numpy.ndarray
        The ``uint8`` display image at source resolution ``(rows, cols)``, and the
        ``float32`` model input ``(3, H, W)``.

    Raises
    ------
    dicomai.errors.NotEvaluable
        If the image cannot be decoded or rendered.
    """
    image = render(ds, frame)
    _large_enough(image.shape, spec)
    return to_display(image), to_model_input(image, spec)


# A side this many times smaller than the model's, or more, is blown up from too few pixels
# for the model to see anything (an 8x8 icon came out "Nodule Present, 100 %" at 128x128).
MAX_UPSCALE = 16


def _large_enough(shape: tuple[int, ...], spec: InputSpec) -> None:
    rows, cols = shape[:2]
    if rows * MAX_UPSCALE <= spec.size[0] or cols * MAX_UPSCALE <= spec.size[1]:
        raise NotEvaluable(
            f"image too small for the model: {rows}×{cols} against its "
            f"{spec.size[0]}×{spec.size[1]} input"
        )


def selected_frames(ds: Dataset, spec: InputSpec) -> list[int]:
    """Return the frame indices a model with `spec` evaluates in `ds`.

    Parameters
    ----------
    ds : pydicom.Dataset
        The instance.
    spec : InputSpec
        The model's input specification.

    Returns
    -------
    list of int
        ``[0]`` for ``frames="first"``, every frame for ``frames="all"``.
    """
    if spec.frames is FrameSelection.FIRST:
        return [0]
    return list(range(frame_count(ds)))


def _functional_groups(ds: Dataset, frame: int) -> list[Dataset]:
    groups = []
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        groups.append(shared[0])
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame and frame < len(per_frame):
        groups.append(per_frame[frame])
    return groups


def _luminance(rgb: np.ndarray, maximum: int) -> np.ndarray:
    luma = rgb.astype(np.float64) @ _LUMA / max(maximum, 1)
    return np.clip(luma, 0.0, 1.0).astype(np.float32)


def _modality(stored: np.ndarray, attrs: Dataset) -> np.ndarray:
    try:
        values = np.asarray(apply_modality_lut(stored, attrs), dtype=np.float64)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        raise NotEvaluable("invalid modality LUT or rescale") from exc
    if not np.isfinite(values).all():
        raise NotEvaluable("modality LUT or rescale gives non-finite values")
    return values


def _render_monochrome(stored: np.ndarray, ds: Dataset, frame: int, inverted: bool) -> np.ndarray:
    attrs = lut_attributes(ds, frame)
    values = _modality(stored, attrs)
    image = _apply_voi(values, attrs)
    if image is None:
        if values.min() == values.max():
            # No contrast to show in either polarity; zeros keep every later step finite.
            return np.zeros(values.shape, dtype=np.float32)
        image = _auto_window(values, is_ct=ds.get("Modality") == "CT")
    image = np.asarray(image, dtype=np.float32)
    if inverted:
        # PS3.3 C.7.6.3.1.2: in MONOCHROME1 the minimum value is displayed white.
        image = 1.0 - image
    return np.clip(image, 0.0, 1.0, out=image)


def _apply_voi(values: np.ndarray, attrs: Dataset) -> np.ndarray | None:
    try:
        if attrs.get("VOILUTSequence"):
            return _apply_voi_lut_sequence(values, attrs)
        if "WindowCenter" in attrs and "WindowWidth" in attrs:
            return _apply_window(values, attrs)
    except _INVALID_WINDOW:
        return None
    return None


def _apply_voi_lut_sequence(values: np.ndarray, attrs: Dataset) -> np.ndarray:
    # A VOI LUT is indexed by integers; rounding also spares pydicom's float warning.
    indices = np.rint(values).astype(np.int64)
    mapped = apply_voi(indices, attrs)
    entries, first, _ = attrs.VOILUTSequence[0].LUTDescriptor
    table = apply_voi(np.arange(first, first + (entries or 2**16), dtype=np.int64), attrs)
    top = int(table.max())
    if top == 0:
        return np.zeros(values.shape)
    # The descriptor's bits per entry is often larger than the entries use (16 declared
    # for 12-bit data), which would render the image nearly black; scale by the depth the
    # entries actually need instead.
    return mapped / float(2 ** top.bit_length() - 1)


def _apply_window(values: np.ndarray, attrs: Dataset) -> np.ndarray:
    linear = _linear_window(attrs)
    if linear is not None:
        # PS3.3 C.11.2.1.2.1's LINEAR function is this clipped line. pydicom computes it in
        # float64 through three masks, 1.4 ms of a 512² radiograph's 4.5 ms on the worker's
        # path; one float32 pass takes 0.1 ms (equal to 3e-8).
        scale, offset = linear
        image = values.astype(np.float32)
        image *= scale
        image += offset
        return np.clip(image, 0.0, 1.0, out=image)
    # A bare unsigned 16-bit view without rescale pins pydicom's output range to 0..65535
    # whatever the source's bit depth, sign and rescale, so the result scales to [0, 1].
    view = Dataset()
    view.PhotometricInterpretation = "MONOCHROME2"
    view.BitsStored = 16
    view.PixelRepresentation = 0
    for keyword in ("WindowCenter", "WindowWidth", "VOILUTFunction"):
        if keyword in attrs:
            view[keyword] = attrs[keyword]
    return np.asarray(apply_voi_lut(values, view, index=0)) / 65535.0


def _linear_window(attrs: Dataset) -> tuple[float, float] | None:
    """Scale and offset of the first window when it is LINEAR with a finite centre and a
    width over 1; None leaves the window (or its error) to pydicom."""
    function = attrs.get("VOILUTFunction") or "LINEAR"
    if str(function).strip().upper() != "LINEAR":
        return None
    center, width = _first_value(attrs.WindowCenter), _first_value(attrs.WindowWidth)
    if not (math.isfinite(center) and math.isfinite(width) and width > 1):
        return None
    scale = 1.0 / (width - 1)
    return scale, 0.5 - (center - 0.5) * scale


def _first_value(value: object) -> float:
    if isinstance(value, MultiValue | list | tuple):
        value = value[0]
    return float(value)  # type: ignore[arg-type]


def _auto_window(values: np.ndarray, is_ct: bool) -> np.ndarray:
    low, high = float(values.min()), float(values.max())
    if is_ct:
        # CT holds padding (-2000, -3024) and metal far outside the anatomy; the central
        # 99 % of values keeps soft tissue from collapsing into one grey.
        p_low, p_high = np.percentile(values, (0.5, 99.5))
        if p_high > p_low:
            low, high = float(p_low), float(p_high)
    # float32 halves the memory traffic of the largest arrays here (a 4k² radiograph); its
    # 24-bit mantissa still resolves every level of 16-bit data. The caller clips.
    return (values.astype(np.float32) - low) / (high - low)


def _equalize(image01: np.ndarray, spec: InputSpec) -> np.ndarray:
    if spec.equalize is Equalization.NONE:
        return np.asarray(image01, dtype=np.float32)
    display = to_display(image01)
    if spec.equalize is Equalization.HIST:
        equalized = cv2.equalizeHist(display)
    else:
        clahe = cv2.createCLAHE(clipLimit=spec.clahe_clip, tileGridSize=(8, 8))
        equalized = clahe.apply(display)
    return equalized.astype(np.float32) / 255.0
