"""Reading DICOM instances and decoding their stored pixel values."""

from __future__ import annotations

import logging
import math
import os
import struct
from collections.abc import Iterator
from io import BytesIO
from itertools import islice
from typing import Any

import numpy as np
from pydicom import Dataset, dcmread
from pydicom.datadict import dictionary_VR, keyword_for_tag
from pydicom.dataelem import RawDataElement
from pydicom.encaps import generate_frames, get_frame, parse_basic_offsets, parse_fragments
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import get_decoder, pixel_array
from pydicom.uid import UID, RLELossless

from dicomai.errors import NotEvaluable

log = logging.getLogger(__name__)

_PIXEL_DATA = 0x7FE00010
_NUMBERS = frozenset({"DS", "IS"})

# Larger than any detector or scanned film we know of; a header claiming more is corrupt
# or hostile, and decoding it would exhaust memory before anything else noticed.
MAX_SIDE = 16384
MAX_PIXELS = 1_000_000_000

# Decoders tried in this order, each one the fallback of the one before. FACTS.md: on a 2048²
# JPEG-LS image pyjpegls (CharLS) takes 80 ms against 330 ms for pylibjpeg. pydicom itself
# would try GDCM first.
_PLUGIN_ORDER = ("pyjpegls", "pylibjpeg", "pydicom", "pillow")
# GDCM throws C++ exceptions that Python cannot catch on a codestream whose size or components
# differ from Rows/Columns/Samples per Pixel (JPEG-LS, JPEG 2000): the process aborts (SIGABRT),
# taking every job of its batch with it; on a JPEG-LS stream with fewer Columns than it holds it
# returned scrambled strips. Every syntax it decodes has pylibjpeg too, so it is used only where
# it is the one decoder installed for a syntax, behind the codestream check.
_LAST_RESORT = "gdcm"

# ISO/IEC 10918-1 B.1.1.3 start-of-frame markers (not DHT C4, JPG C8, DAC CC), and
# ISO/IEC 14495-1's SOF55 (F7) for JPEG-LS; all share one layout.
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC} | {0xF7}
_SOS_MARKER = 0xDA
# ISO/IEC 10918-1 B.1.1.3 EOI, ISO/IEC 15444-1 A.4.4 EOC: the end of a frame's codestream.
_END_OF_IMAGE = b"\xff\xd9"

# The dataset attribute (not a DICOM element) where `_frames_held` keeps its count.
_HELD = "_dicomai_frames_held"


def read_instance(path: str | os.PathLike[str]) -> Dataset:
    """Read a DICOM Part 10 file.

    Parameters
    ----------
    path : str or os.PathLike
        The file to read.

    Returns
    -------
    pydicom.Dataset
        The dataset, pixel data included (decoded later by :func:`pixel_frames`).

    Raises
    ------
    dicomai.errors.NotEvaluable
        If the file is not DICOM or its header cannot be parsed.
    OSError
        If the file cannot be opened: a storage problem, not a property of the image.
    """
    try:
        dataset = dcmread(path)
    except InvalidDicomError as exc:
        raise NotEvaluable("not a DICOM file") from exc
    except (ValueError, EOFError, KeyError, TypeError) as exc:
        raise NotEvaluable("DICOM header could not be parsed") from exc
    relabelled = relabel_identification(dataset)
    if relabelled:
        log.warning(
            "%s: patient or study identification sent with another VR, read as its "
            "dictionary's: %s",
            dataset.get("SOPInstanceUID", "instance"),
            ", ".join(relabelled),
        )
    dropped = drop_unreadable_values(dataset)
    if dropped:
        log.warning(
            "%s: values that are not what their VR says left out: %s",
            dataset.get("SOPInstanceUID", "instance"),
            ", ".join(dropped),
        )
    return dataset


# Copied from each source into the SR and overlays, which the PACS files by them.
_IDENTIFICATION = frozenset(
    {
        0x00080020,  # Study Date
        0x00080030,  # Study Time
        0x00080050,  # Accession Number
        0x00080090,  # Referring Physician's Name
        0x00081030,  # Study Description
        0x0020000D,  # Study Instance UID
        0x00200010,  # Study ID
    }
)


def relabel_identification(dataset: Dataset) -> list[str]:
    """Read the patient's and the study's identification with their dictionary VRs; return
    the keywords of those sent with another.

    A Patient ID labelled DS was dropped as a number that is not one, and the results reached
    the PACS without it; a Patient's Name labelled US read as integers and failed every
    attempt of the study's job. The value's bytes are the sender's text either way.
    """
    relabelled = []
    for tag, raw in list(dataset._dict.items()):
        if not (tag.group == 0x0010 or tag in _IDENTIFICATION) or not isinstance(
            raw, RawDataElement
        ):
            continue
        vr = _dictionary_vr(tag)
        if raw.VR in (None, "UN", vr) or not vr or " " in vr or vr == "SQ":
            continue
        dataset._dict[tag] = raw._replace(VR=vr)
        relabelled.append(keyword_for_tag(tag) or str(tag))
    return relabelled


def drop_unreadable_values(dataset: Dataset) -> list[str]:
    """Remove the numbers (DS, IS) that are not numbers, in nested items too; return their
    keywords.

    A Slice Thickness of "thin" or a Number of Frames of "1A" is stored as received and
    pydicom reads it as text, but everything that used the source after (the image library,
    the overlay, highdicom's copies of its header, which validate what they write) failed
    with it: one such value in one image failed the report of the whole study. Without it
    the image is described by what is left, like an image that never had it.
    """
    dropped: list[str] = []
    for tag, raw in list(dataset._dict.items()):
        # Only numbers and sequences are looked at: converting every element of every
        # source cost 0.6 ms a file.
        # UN: sent by a router or archive whose dictionary lacks the tag; pydicom reads it
        # with the dictionary's VR, so that is the one to check.
        vr = raw.VR if raw.VR not in (None, "UN") else _dictionary_vr(tag)
        if vr not in _NUMBERS and vr != "SQ":
            continue
        try:
            element = dataset[tag]
            readable = element.VR not in _NUMBERS or all(
                isinstance(value, int | float) for value in _values(element.value)
            )
        except (ValueError, TypeError, OverflowError, KeyError):
            readable = False
        if not readable:
            dropped.append(keyword_for_tag(tag) or str(tag))
            del dataset[tag]
        elif element.VR == "SQ":
            for item in element.value:
                dropped += drop_unreadable_values(item)
    return dropped


def _dictionary_vr(tag: int) -> str:
    try:
        return dictionary_VR(tag)
    except KeyError:  # a private or unknown tag: nothing we read
        return ""


def _values(value: object) -> list[object]:
    if value is None or value == "":
        return []
    return list(value) if isinstance(value, MultiValue | list) else [value]


def frame_count(ds: Dataset) -> int:
    """Return the number of frames in `ds` (1 when Number of Frames is absent).

    Parameters
    ----------
    ds : pydicom.Dataset
        The instance.

    Returns
    -------
    int
        The number of frames.

    Raises
    ------
    dicomai.errors.NotEvaluable
        If Number of Frames is not a positive integer.
    """
    value = ds.get("NumberOfFrames", 1)
    try:
        count = int(value) if value not in (None, "") else 1
    except (TypeError, ValueError):
        raise NotEvaluable("invalid Number of Frames") from None
    if count < 1:
        raise NotEvaluable("invalid Number of Frames")
    return count


def pixel_frames(ds: Dataset, index: int | None = None) -> np.ndarray:
    """Decode the stored pixel values of `ds`, frame first.

    Colour images come back as RGB (pydicom converts YBR on decoding); no LUT is applied.

    Parameters
    ----------
    ds : pydicom.Dataset
        The instance.
    index : int, optional
        Decode only this frame (zero-based); by default all frames are decoded.

    Returns
    -------
    numpy.ndarray
        ``(frames, rows, cols)`` for monochrome and palette images, ``(frames, rows, cols, 3)``
        for colour; ``frames`` is 1 when `index` is given.

    Raises
    ------
    dicomai.errors.NotEvaluable
        If there is no pixel data, the dimensions are absent or absurd, the data is shorter
        than the dimensions require, compressed data hold fewer frames than Number of Frames
        (whichever frame `index` asks for), a JPEG, JPEG-LS or JPEG 2000 codestream declares
        other dimensions or components than the header, no decoder handles the transfer
        syntax, or decoding fails. The reason names no patient data.

    Notes
    -----
    Pixel data holding more whole frames than Number of Frames are read by their first Number
    of Frames frames, as a viewer shows them; one warning is logged per dataset.
    """
    samples = _check_geometry(ds)
    declared = frame_count(ds)
    if index is not None and not 0 <= index < declared:
        raise NotEvaluable(f"frame {index} does not exist")
    tsyntax = _transfer_syntax(ds)
    held = _frames_held(ds, samples, tsyntax)
    options: dict[str, Any] = {}
    if held > declared and tsyntax.is_encapsulated:
        # pydicom, told of the extra frames, delimits the fragments as they were counted: an
        # RLE frame is one fragment, and without them it took every fragment for frame 1 and
        # found no frame 2.
        options = {"number_of_frames": held}
    elif held > declared:
        options = {"allow_excess_frames": False}  # else returned with the declared ones
    if tsyntax.is_encapsulated:
        _check_codestreams(ds, samples, index, held)
    if index is None and held > declared and tsyntax.is_encapsulated:
        # Frame by frame: all frames at once would be all `held` of them.
        arr = np.stack([_decode(ds, tsyntax, i, options) for i in range(declared)])
    else:
        arr = _decode(ds, tsyntax, index, options)
    single = 2 if samples == 1 else 3
    arr = arr[np.newaxis] if arr.ndim == single else arr
    expected = (1 if index is not None else declared, ds.Rows, ds.Columns)
    if arr.shape != expected + ((samples,) if samples > 1 else ()):
        raise NotEvaluable("decoded pixel data do not match Rows, Columns and Samples per Pixel")
    return arr


def _check_geometry(ds: Dataset) -> int:
    if "PixelData" not in ds:
        raise NotEvaluable("no pixel data")
    rows, cols = ds.get("Rows"), ds.get("Columns")
    if not isinstance(rows, int) or not isinstance(cols, int) or rows < 1 or cols < 1:
        raise NotEvaluable("missing or invalid Rows/Columns")
    if rows > MAX_SIDE or cols > MAX_SIDE:
        raise NotEvaluable(f"image of {rows}x{cols} exceeds {MAX_SIDE} pixels per side")
    samples = ds.get("SamplesPerPixel", 1)
    if samples not in (1, 3):
        raise NotEvaluable("Samples per Pixel must be 1 or 3")
    if rows * cols * samples * frame_count(ds) > MAX_PIXELS:
        raise NotEvaluable(f"pixel data of more than {MAX_PIXELS} samples")
    return int(samples)


def _transfer_syntax(ds: Dataset) -> UID:
    meta = getattr(ds, "file_meta", None)
    tsyntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if not tsyntax:
        raise NotEvaluable("no transfer syntax in the file meta information")
    tsyntax = UID(tsyntax)
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError:
        raise NotEvaluable(f"unsupported transfer syntax {tsyntax}") from None
    if not decoder.is_available:
        raise NotEvaluable(f"no decoder installed for {tsyntax.name}")
    return tsyntax


def _frames_held(ds: Dataset, samples: int, tsyntax: UID) -> int:
    """How many whole frames the pixel data of `ds` hold, at least Number of Frames.

    Counted once per dataset and pixel data, without decoding: a cine's frames are read one
    call each. More frames than Number of Frames are logged (a malformed source whose extra
    frames are not read, as a viewer does not show them); fewer are refused, for every frame,
    so that frame 1 is not evaluated alone as though it were the image.

    Raises
    ------
    dicomai.errors.NotEvaluable
        If the pixel data hold fewer frames than Number of Frames, or native data are shorter
        than their dimensions need.
    """
    pixels = ds.PixelData
    declared = frame_count(ds)
    key = (tsyntax, declared, ds.Rows, ds.Columns, samples, ds.get("BitsAllocated"))
    cached = getattr(ds, _HELD, None)
    if cached is not None and cached[0] is pixels and cached[1] == key:
        return int(cached[2])
    if tsyntax.is_encapsulated:
        held = _encapsulated_frames(pixels, ds, tsyntax)
    else:
        held = _native_frames(ds, samples)
    if held < declared:
        raise NotEvaluable(
            f"Number of Frames is {declared}, the pixel data hold {held} "
            f"frame{'' if held == 1 else 's'}"
        )
    # Kept with the pixel data it counts (compared by identity, so never stale); a plain
    # attribute, not an element: pydicom leaves lower-case names to Python.
    setattr(ds, _HELD, (pixels, key, held))
    if held > declared:
        log.warning(
            "%s: Number of Frames is %d, the pixel data hold %d frames; only the first %d are read",
            ds.get("SOPInstanceUID", "instance"),
            declared,
            held,
            declared,
        )
    return held


def _native_frames(ds: Dataset, samples: int) -> int:
    bits_allocated = ds.get("BitsAllocated")
    if bits_allocated not in (1, 8, 16, 32, 64):
        raise NotEvaluable("invalid Bits Allocated")
    frame_bits = ds.Rows * ds.Columns * samples * bits_allocated
    if ds.get("PhotometricInterpretation") == "YBR_FULL_422":
        # PS3.3 C.7.6.3.1.2: two chroma samples are shared by each pair of pixels.
        frame_bits = frame_bits * 2 // 3
    expected = math.ceil(frame_bits * frame_count(ds) / 8)
    actual = len(ds.PixelData)
    if actual < expected:
        raise NotEvaluable(f"pixel data is {actual} bytes, its dimensions need {expected}")
    return actual * 8 // frame_bits


def _encapsulated_frames(pixels: bytes, ds: Dataset, tsyntax: UID) -> int:
    """The frames encapsulated `pixels` hold, delimited as pydicom delimits them for decoding,
    from the offset tables and the items' headers only (PS3.5 A.4)."""
    declared = frame_count(ds)
    buffer = BytesIO(pixels)  # shares the bytes: nothing is copied
    try:
        basic = parse_basic_offsets(buffer)
        start = buffer.tell()
        count, positions = parse_fragments(buffer)
    except (ValueError, struct.error):
        return declared  # an encapsulation the decoders reject with their own error
    extended = _extended_offsets(ds)
    if extended is not None:
        # PS3.3 C.7.6.3.1.8: one fragment a frame, at these offsets from the first one.
        return sum(
            start + offset + 8 + length <= len(pixels)
            for offset, length in zip(*extended, strict=False)
        )
    if basic:
        # pydicom begins the next frame at the first fragment at or past its offset.
        held = 1
        for position in positions:
            if held < len(basic) and position - start >= basic[held]:
                held += 1
        return held
    if count in (0, declared):
        return count
    if count == 1 or declared == 1:
        return 1  # pydicom: one fragment is one frame, and one frame may be many fragments
    if tsyntax == RLELossless:
        return count  # PS3.5 A.4.2: each frame is one fragment
    # pydicom: a frame ends with the fragment whose last bytes hold the end of a codestream;
    # fragments after the last such one are a frame of their own.
    ends = [_END_OF_IMAGE in pixels[end - 10 : end] for end in _fragment_ends(pixels, positions)]
    return sum(ends) + (not ends[-1])


def _fragment_ends(pixels: bytes, positions: list[int]) -> Iterator[int]:
    for position in positions:
        (length,) = struct.unpack_from("<L", pixels, position + 4)
        yield position + 8 + length


def _extended_offsets(ds: Dataset) -> tuple[list[int], list[int]] | None:
    if "ExtendedOffsetTable" not in ds or "ExtendedOffsetTableLengths" not in ds:
        return None
    tables = []
    for raw in (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths):
        if isinstance(raw, bytes | bytearray):
            raw = struct.unpack(f"<{len(raw) // 8}Q", raw[: len(raw) // 8 * 8])
        tables.append([int(value) for value in raw])
    return tables[0], tables[1]


def _check_codestreams(ds: Dataset, samples: int, index: int | None, frames: int) -> None:
    """Refuse a JPEG, JPEG-LS or JPEG 2000 frame whose codestream declares another size or
    number of components than the header: a bad file, not a codec missing, which no decoder
    is to be tried on (GDCM aborts the process on some). `frames`: how many the pixel data
    hold, of which Number of Frames are checked."""
    declared = (ds.Rows, ds.Columns, samples)
    streams = _codestreams(ds, index, frames)
    for frame in islice(streams, None if index is not None else frame_count(ds)):
        size = _codestream_size(frame)
        if size is None:
            continue
        rows, cols, components = size
        # ISO/IEC 10918-1 B.2.2: a JPEG frame header may give 0 lines, defined later by DNL.
        if (rows or ds.Rows, cols, components) != declared:
            raise NotEvaluable(
                f"pixel data do not match their dimensions: the codestream holds "
                f"{rows}x{cols}x{components}, Rows/Columns/Samples per Pixel say "
                f"{ds.Rows}x{ds.Columns}x{samples}"
            )


def _codestreams(ds: Dataset, index: int | None, count: int) -> Iterator[bytes]:
    offsets = None
    if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
        offsets = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
    try:
        if index is not None:
            yield get_frame(ds.PixelData, index, number_of_frames=count, extended_offsets=offsets)
        else:
            yield from generate_frames(
                ds.PixelData, number_of_frames=count, extended_offsets=offsets
            )
    except (ValueError, TypeError, KeyError, IndexError, struct.error):
        return  # an encapsulation the decoders reject with their own error


def _codestream_size(frame: bytes) -> tuple[int, int, int] | None:
    """Rows, columns and components a JPEG, JPEG-LS or JPEG 2000 codestream declares; None
    where it is none of these or its header cannot be read (the decoders judge those)."""
    try:
        if frame.startswith(b"\xff\xd8"):
            return _jpeg_size(frame)
        if frame.startswith(b"\xff\x4f\xff\x51"):
            # ISO/IEC 15444-1 A.5.1, SIZ: Lsiz Rsiz Xsiz Ysiz XOsiz YOsiz XTsiz YTsiz XTOsiz
            # YTOsiz Csiz; the image area is the reference grid less its offset.
            xsiz, ysiz, xosiz, yosiz = struct.unpack_from(">4I", frame, 8)
            (components,) = struct.unpack_from(">H", frame, 40)
            return ysiz - yosiz, xsiz - xosiz, components
    except (struct.error, IndexError):
        return None
    return None


def _jpeg_size(frame: bytes) -> tuple[int, int, int] | None:
    offset = 2
    while offset + 4 <= len(frame) and frame[offset] == 0xFF:
        marker = frame[offset + 1]
        if marker == 0xFF:  # B.1.1.2: fill bytes before a marker
            offset += 1
            continue
        if marker in _SOF_MARKERS:
            # B.2.2: Lf, P, Y (lines), X (samples per line), Nf (components)
            rows, cols = struct.unpack_from(">HH", frame, offset + 5)
            return rows, cols, frame[offset + 9]
        if marker == _SOS_MARKER:
            return None
        (length,) = struct.unpack_from(">H", frame, offset + 2)
        offset += 2 + length
    return None


def _decode(ds: Dataset, tsyntax: UID, index: int | None, options: dict[str, Any]) -> np.ndarray:
    """Decode `ds`, or its frame `index`, with pydicom's decoding `options`."""
    failure: Exception | None = None
    for plugin in _plugins(tsyntax):
        # Decoders are third-party code whose errors on corrupt data are of no fixed type
        # (ValueError, RuntimeError, OSError from Pillow, struct.error...): whichever it is,
        # the image cannot be evaluated.
        try:
            return pixel_array(ds, index=index, decoding_plugin=plugin, **options)
        except Exception as exc:
            failure = exc
    raise NotEvaluable(f"pixel data could not be decoded ({tsyntax.name})") from failure


def _plugins(tsyntax: UID) -> list[str]:
    if not tsyntax.is_encapsulated:
        return [""]  # pydicom's own native decoder, the only one there is
    available = get_decoder(tsyntax).available_plugins
    known = [name for name in _PLUGIN_ORDER if name in available]
    others = known + sorted(set(available) - set(known) - {_LAST_RESORT})
    return others or [name for name in available if name == _LAST_RESORT]
