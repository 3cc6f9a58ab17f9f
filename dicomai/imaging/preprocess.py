"""Rendering DICOM pixels as a radiologist sees them, and turning them into model input."""

from __future__ import annotations

import math
import struct

import cv2
import numpy as np
from pydicom import Dataset
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut
from pydicom.uid import UID

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

# What a malformed lookup table or window raises in pydicom and numpy: a LUT Data shorter
# than its descriptor fails in struct.unpack, a palette of 12 bits per entry as a numpy dtype
# "uint12" that does not exist, an unknown VOI LUT Function as ValueError. One such image
# failed the job of its whole study.
_LUT_ERRORS = (
    ValueError,
    TypeError,
    IndexError,
    KeyError,
    AttributeError,
    NotImplementedError,
    OverflowError,
    struct.error,
)


def render(
    ds: Dataset,
    frame: int = 0,
    window: tuple[float, float] | None = None,
    colour: bool = False,
) -> np.ndarray:
    """Render one frame as a radiologist's viewer displays it.

    Monochrome images go through the modality LUT, then the VOI LUT or the first valid window
    (without either: the data's range, or its 0.5-99.5 percentiles for CT), and MONOCHROME1
    is inverted so that bright always means dense. Colour and palette images become their
    luminance, or stay RGB with `colour`.

    Parameters
    ----------
    ds : pydicom.Dataset
        The instance.
    frame : int
        Zero-based frame index.
    window : tuple of float, optional
        ``(center, width)`` in modality units (Hounsfield units for CT), applied as a LINEAR
        window (PS3.3 C.11.2.1.2.1) in place of the image's own VOI LUT and windows; the
        model's ``[input] window`` (`InputSpec.voi_window`). Colour images ignore it.
    colour : bool
        Return colour and palette images as RGB (`InputSpec.keeps_colour`).

    Returns
    -------
    numpy.ndarray
        ``float32`` array of shape ``(rows, cols)``, or ``(rows, cols, 3)`` for a colour
        image rendered with `colour`, with values in [0, 1]; a constant image renders as
        zeros.

    Raises
    ------
    dicomai.errors.NotEvaluable
        If the pixels cannot be decoded, the LUTs cannot be applied, the result is not
        finite, or the VOI transformation leaves an image of one grey from stored pixels
        that differ.
    """
    stored = pixel_frames(ds, index=frame)[0]
    image = _render(stored, ds, frame, window, colour)
    # min and max are NaN if any value is: one pass each, where isfinite would allocate.
    low, high = float(image.min()), float(image.max())
    if not (math.isfinite(low) and math.isfinite(high)):
        raise NotEvaluable("rendering gives non-finite values")
    if low == high and stored.ndim == 2 and stored.min() != stored.max():
        # A window or VOI LUT past every pixel (a negative first value written unsigned
        # mapped all of a CT to black), palette indices past a short table: the model would
        # be shown a blank as an image. A constant image stays what it is.
        raise NotEvaluable("the LUTs or window leave the image without contrast")
    return image


def _render(
    stored: np.ndarray,
    ds: Dataset,
    frame: int,
    window: tuple[float, float] | None,
    colour: bool,
) -> np.ndarray:
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if stored.ndim == 3:
        bits = min(int(ds.get("BitsStored", 8 * stored.itemsize)), 8 * stored.itemsize)
        return _rgb01(stored, 2**bits - 1) if colour else _luminance(stored, 2**bits - 1)
    if photometric == "PALETTE COLOR":
        return _palette(stored, ds, colour)
    if photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise NotEvaluable(f"unsupported Photometric Interpretation {photometric[:16]!r}")
    inverted = photometric == "MONOCHROME1"
    return _render_monochrome(stored, ds, frame, inverted, window)


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
        ``(rows, cols)`` values in [0, 1], as returned by :func:`render`, repeated into the
        three channels; or ``(rows, cols, 3)`` RGB, its channels kept.
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
    channels = resized.transpose(2, 0, 1) if resized.ndim == 3 else resized[None, :, :]
    return np.ascontiguousarray((channels - mean) / std, dtype=np.float32)


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
        If the image cannot be decoded or rendered, is too small for the model, or the
        frame is blank (one value everywhere; see `blank_reason`).
    """
    prepared = prepare_unless_blank(ds, spec, frame)
    if prepared is None:
        raise NotEvaluable(blank_reason(ds, frame))
    return prepared


# A failed exposure, a blank frame, a test pattern of one value: the model would report on no
# anatomy, and its "Absent" at 0 % reads as a certain negative.
BLANK = "image is blank: every pixel has the same value"


def blank_reason(ds: Dataset, frame: int = 0) -> str:
    """Why a blank `frame` of `ds` is not evaluated: `BLANK`, or of a multi-frame image
    "frame 1 is blank: ...", since the image is not blank, only the frame read (the dark
    lead-in frame of an XA run read with ``frames = "first"``).

    Raises
    ------
    dicomai.errors.NotEvaluable
        If Number of Frames is not a positive integer.
    """
    if frame_count(ds) > 1:
        return f"frame {frame + 1} is blank: every pixel has the same value"
    return BLANK


def prepare_unless_blank(
    ds: Dataset, spec: InputSpec, frame: int = 0
) -> tuple[np.ndarray, np.ndarray] | None:
    """`prepare`, but None for a blank frame, where the caller decides what a blank means:
    one blank frame of a multi-frame image whose frames are all read is left out.

    Raises
    ------
    dicomai.errors.NotEvaluable
        If the image cannot be decoded or rendered, or is too small for the model.
    """
    image = render(ds, frame, spec.voi_window, colour=spec.keeps_colour)
    _large_enough(image.shape, spec)
    if is_blank(image):
        return None
    # Overlays and masks are drawn on the grey image, where a heat map's colours read.
    grey = luminance01(image) if image.ndim == 3 else image
    return to_display(grey), to_model_input(image, spec)


def require_evaluable(image01: np.ndarray, spec: InputSpec) -> None:
    """Refuse a rendered image the daemon would not evaluate: too small for the model, or blank.

    Raises
    ------
    dicomai.errors.NotEvaluable
        With the reason the daemon gives.
    """
    _large_enough(image01.shape, spec)
    if is_blank(image01):
        raise NotEvaluable(BLANK)


def is_blank(image01: np.ndarray) -> bool:
    """Whether a rendered image, grey or RGB, has one value (one colour) in every pixel."""
    return bool((image01 == image01[0, 0]).all())


# A side this many times smaller than the model's, or more, is blown up from too few pixels
# for the model to see anything (an 8x8 icon came out "Nodule Present, 100 %" at 128x128).
MAX_UPSCALE = 16


def _large_enough(shape: tuple[int, ...], spec: InputSpec) -> None:
    rows, cols = shape[:2]
    if rows * MAX_UPSCALE <= spec.size[0] or cols * MAX_UPSCALE <= spec.size[1]:
        raise NotEvaluable(
            f"image too small for the model: {rows}x{cols} against its "
            f"{spec.size[0]}x{spec.size[1]} input"
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


def luminance01(rgb01: np.ndarray) -> np.ndarray:
    """The luminance of an RGB image in [0, 1] (ITU-R BT.601), for display."""
    return _luminance(rgb01, 1)


def _rgb01(rgb: np.ndarray, maximum: int) -> np.ndarray:
    image = rgb.astype(np.float32)
    image *= 1.0 / max(maximum, 1)
    return np.clip(image, 0.0, 1.0, out=image)


def _palette(stored: np.ndarray, ds: Dataset, colour: bool) -> np.ndarray:
    try:
        bits = _palette_bits(ds)
        rgb = apply_color_lut(stored, ds)
    except _LUT_ERRORS as exc:
        raise NotEvaluable("invalid palette colour lookup table") from exc
    # PS3.3 C.7.6.3.1.5: the descriptor's bits per entry, not the array's dtype, is the scale.
    # 8-bit entries in 16-bit words come back as uint16 of 0-255, which over 65535 rendered
    # the image black.
    return _rgb01(rgb, 2**bits - 1) if colour else _luminance(rgb, 2**bits - 1)


def _palette_bits(ds: Dataset) -> int:
    depths = {
        int(ds[f"{colour}PaletteColorLookupTableDescriptor"].value[2])
        for colour in ("Red", "Green", "Blue")
    }
    if len(depths) != 1 or not depths <= {8, 16}:
        # PS3.3 C.7.6.3.1.5: 8 or 16 bits per entry, the same for the three tables.
        raise ValueError("palette entries must all be 8 or all be 16 bits")
    return depths.pop()


def _modality(stored: np.ndarray, attrs: Dataset) -> np.ndarray:
    try:
        values = np.asarray(apply_modality_lut(stored, attrs), dtype=np.float64)
    except _LUT_ERRORS as exc:
        raise NotEvaluable("invalid modality LUT or rescale") from exc
    if not np.isfinite(values).all():
        raise NotEvaluable("modality LUT or rescale gives non-finite values")
    return values


def _render_monochrome(
    stored: np.ndarray,
    ds: Dataset,
    frame: int,
    inverted: bool,
    window: tuple[float, float] | None,
) -> np.ndarray:
    attrs = lut_attributes(ds, frame)
    values = _modality(stored, attrs)
    image = _apply_voi(values, attrs) if window is None else _linear(values, *window)
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
    """The image's VOI LUT, else its first valid window; None where it has neither.

    An invalid VOI LUT or window is passed over, as a viewer passes over it.
    """
    if attrs.get("VOILUTSequence"):
        try:
            return _apply_voi_lut_sequence(values, attrs)
        except _LUT_ERRORS:
            pass
    if "WindowCenter" in attrs and "WindowWidth" in attrs:
        try:
            return _apply_window(values, attrs)
        except _LUT_ERRORS:
            return None
    return None


def _apply_voi_lut_sequence(values: np.ndarray, attrs: Dataset) -> np.ndarray:
    table, first = _voi_lut(attrs.VOILUTSequence[0], attrs, values)
    # int64 indices: pydicom 3.0.2's apply_voi builds them in the entries' dtype, uint8 for
    # 8-bit entries, so that input 256 and over wrapped into a sawtooth. Clipping in float
    # first keeps huge modality values from overflowing the cast.
    indices = np.clip(np.rint(values) - first, 0, table.size - 1).astype(np.intp)
    top = int(table.max())
    if top == 0:
        return np.zeros(values.shape)
    # The descriptor's bits per entry is often larger than the entries use (16 declared
    # for 12-bit data), which would render the image nearly black; scale by the depth the
    # entries actually need instead.
    return table[indices] / float(2 ** top.bit_length() - 1)


def _voi_lut(item: Dataset, attrs: Dataset, values: np.ndarray) -> tuple[np.ndarray, int]:
    """The entries and first mapped input value of a VOI LUT item (PS3.3 C.11.2.1.1).

    Raises
    ------
    ValueError
        If the descriptor is not three values with 8 to 16 bits per entry, or the data
        hold fewer entries than it declares.
    """
    entries, first, bits = (int(value) for value in item.LUTDescriptor)
    if not 8 <= bits <= 16:
        raise ValueError(f"{bits} bits per VOI LUT entry")
    # PS3.3 C.11.2.1.1: 0 stands for 2^16 entries; the modulo undoes a descriptor read as SS
    # (40000 entries as -25536).
    entries = entries % 2**16 or 2**16
    if first >= 2**15 and (attrs.get("PixelRepresentation") == 1 or values.min() < 0):
        # The first value mapped has the input's sign (SS for signed data); senders write
        # -1024 as US 64512, which left every pixel below the table.
        first -= 2**16
    data = item.LUTData
    if isinstance(data, bytes):
        # OW: each entry in a 16-bit word, 8-bit entries included (PS3.3 C.11.2.1.1).
        order = "<" if _little_endian(attrs) else ">"
        table = np.frombuffer(data, dtype=f"{order}u2", count=entries)
    else:
        table = np.asarray(data if isinstance(data, MultiValue | list) else [data])
        if table.size < entries:
            raise ValueError("VOI LUT Data shorter than its descriptor")
        table = table[:entries]
    return table.astype(np.int64), first


def _little_endian(attrs: Dataset) -> bool:
    meta = getattr(attrs, "file_meta", None)
    tsyntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if tsyntax:
        return bool(UID(tsyntax).is_little_endian)
    return attrs.original_encoding[1] is not False


def _apply_window(values: np.ndarray, attrs: Dataset) -> np.ndarray | None:
    function = str(attrs.get("VOILUTFunction") or "LINEAR").strip().upper()
    centers, widths = _numbers(attrs.WindowCenter), _numbers(attrs.WindowWidth)
    # PS3.3 C.11.2.1.2: the windows are alternatives and viewers show the first. One that is
    # not finite or too narrow for its function is passed over, as a viewer passes it over;
    # pydicom returned NaN for a NaN centre, and the model was given a NaN image.
    valid = [
        index
        for index, (center, width) in enumerate(zip(centers, widths, strict=False))
        if _usable_window(center, width, function)
    ]
    if not valid:
        return None
    index = valid[0]
    if function == "LINEAR":
        return _linear(values, centers[index], widths[index])
    # A bare unsigned 16-bit view without rescale pins pydicom's output range to 0..65535
    # whatever the source's bit depth, sign and rescale, so the result scales to [0, 1].
    view = Dataset()
    view.PhotometricInterpretation = "MONOCHROME2"
    view.BitsStored = 16
    view.PixelRepresentation = 0
    view.WindowCenter, view.WindowWidth = centers[index], widths[index]
    view.VOILUTFunction = function
    return np.asarray(apply_voi_lut(values, view, index=0)) / 65535.0


def _usable_window(center: float, width: float, function: str) -> bool:
    if not (math.isfinite(center) and math.isfinite(width)):
        return False
    # PS3.3 C.11.2.1.2.1: LINEAR needs a width of 1 or more; C.11.2.1.3: the others above 0.
    return width >= 1 if function == "LINEAR" else width > 0


def _linear(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1's LINEAR window of `width` >= 1, as values in [0, 1]."""
    if width <= 1:
        # The line's limit: a threshold at center - 0.5.
        return (values > center - 0.5).astype(np.float32)
    # pydicom computes the clipped line in float64 through three masks, 1.4 ms of a 512²
    # radiograph's 4.5 ms on the worker's path; one float32 pass takes 0.1 ms (equal to 3e-8).
    scale = 1.0 / (width - 1)
    image = values.astype(np.float32)
    image *= scale
    image += 0.5 - (center - 0.5) * scale
    return np.clip(image, 0.0, 1.0, out=image)


def _numbers(value: object) -> list[float]:
    if isinstance(value, MultiValue | list | tuple):
        return [float(item) for item in value]
    return [float(value)]  # type: ignore[arg-type]


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
    if display.ndim == 3:
        # The luma alone, as image editors equalise colour: equalising each channel apart
        # would shift the hues a colour model reads.
        ycrcb = cv2.cvtColor(display, cv2.COLOR_RGB2YCrCb)
        ycrcb[..., 0] = _equalized(ycrcb[..., 0], spec)
        return cv2.cvtColor(ycrcb, cv2.COLOR_YCrCb2RGB).astype(np.float32) / 255.0
    return _equalized(display, spec).astype(np.float32) / 255.0


def _equalized(grey: np.ndarray, spec: InputSpec) -> np.ndarray:
    if spec.equalize is Equalization.HIST:
        return cv2.equalizeHist(np.ascontiguousarray(grey))
    clahe = cv2.createCLAHE(clipLimit=spec.clahe_clip, tileGridSize=(8, 8))
    return clahe.apply(np.ascontiguousarray(grey))
