"""Reading the few tags an instance row needs from the encoded bytes, without decoding pixels."""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from io import BytesIO
from typing import Any

from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pydicom.valuerep import VR

from dicomai.errors import InvalidInstance
from dicomai.ingest.limits import inflate_bounded
from dicomai.ingest.tag_scan import scan_tags
from dicomai.uids import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME, is_valid_uid

PREAMBLE = b"\x00" * 128 + b"DICM"
# Two letters that name a VR, as bytes 4-5 of an explicit VR element hold.
_VRS = frozenset(vr.value for vr in VR)
_REQUIRED = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
_HEAD = 64 << 10

# Enough inflated bytes to reach Pixel Data in any ordinary header.
_DEFLATE_HEAD = 16 << 20


@dataclass(frozen=True)
class Header:
    """The identifying attributes of a received instance."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    modality: str | None
    body_part: str | None
    expected_instances: int | None = None
    view_position: str | None = None
    series_description: str | None = None
    manufacturer: str | None = None


def encode_file_meta(file_meta: FileMetaDataset) -> bytes:
    """The File Meta Information group (PS3.10 §7.1), preceded by preamble and prefix."""
    buffer = BytesIO()
    buffer.write(PREAMBLE)
    write_file_meta_info(buffer, file_meta, enforce_standard=True)  # type: ignore[arg-type]
    return buffer.getvalue()


def listener_file_meta(
    sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str, source_ae: str
) -> FileMetaDataset:
    """The file meta group the listener gives a received instance."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class_uid)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance_uid)
    meta.TransferSyntaxUID = UID(transfer_syntax_uid)
    meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    meta.SourceApplicationEntityTitle = source_ae
    return meta


def encode_listener_meta(
    sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str, source_ae: str
) -> bytes:
    """`encode_file_meta` of `listener_file_meta`, byte for byte, written directly.

    Building and encoding a pydicom FileMetaDataset cost a fifth of the listener's time for
    a CT slice. Values that are not plain ASCII of a legal length take pydicom's path.
    """
    uids = (sop_class_uid, sop_instance_uid, transfer_syntax_uid, IMPLEMENTATION_CLASS_UID)
    texts = (IMPLEMENTATION_VERSION_NAME, source_ae)
    if not all(v.isascii() and 0 < len(v) <= 64 for v in uids) or not all(
        v.isascii() and len(v) <= 16 for v in texts
    ):
        return encode_file_meta(
            listener_file_meta(sop_class_uid, sop_instance_uid, transfer_syntax_uid, source_ae)
        )
    elements = [
        _META_VERSION,
        _short_element(0x0002, b"UI", _padded(sop_class_uid, b"\0")),
        _short_element(0x0003, b"UI", _padded(sop_instance_uid, b"\0")),
        _short_element(0x0010, b"UI", _padded(transfer_syntax_uid, b"\0")),
        _short_element(0x0012, b"UI", _padded(IMPLEMENTATION_CLASS_UID, b"\0")),
        _short_element(0x0013, b"SH", _padded(IMPLEMENTATION_VERSION_NAME, b" ")),
        _short_element(0x0016, b"AE", _padded(source_ae, b" ")),
    ]
    body = b"".join(elements)
    length = _short_element(0x0000, b"UL", struct.pack("<I", len(body)))
    return PREAMBLE + length + body


# (0002,0001) File Meta Information Version, OB 00\01 (PS3.10 Table 7.1-1).
_META_VERSION = b"\x02\x00\x01\x00OB\x00\x00\x02\x00\x00\x00\x00\x01"


def _padded(value: str, pad: bytes) -> bytes:
    data = value.encode("ascii")
    return data + pad if len(data) % 2 else data


def _short_element(element: int, vr: bytes, value: bytes) -> bytes:
    """An explicit VR little endian element of group 2 with a 2-byte length."""
    return struct.pack("<HH", 0x0002, element) + vr + struct.pack("<H", len(value)) + value


def encoded_syntax(negotiated: str, dataset: bytes | memoryview) -> str:
    """The transfer syntax the dataset is in: Implicit VR Little Endian where a sender that
    negotiated Explicit VR sent implicit (a known vendor fault), Explicit VR Little Endian
    where one that negotiated Implicit VR sent explicit (pynetdicom sends a file's bytes as
    they are), else the negotiated one.

    The bytes are stored as received; the file meta must say what they are, or readers
    stricter than pydicom (dcmtk's, a viewer's) cannot read the stored file, and pydicom
    itself read the sequences of an explicit dataset labelled implicit without their VRs (the
    study's SR could then not be written). In explicit VR the first element's bytes 4-5 are
    its VR; in implicit VR they are the low bytes of its length.
    """
    if negotiated not in (ExplicitVRLittleEndian, ImplicitVRLittleEndian) or len(dataset) < 8:
        return negotiated
    explicit = bytes(dataset[4:6]).decode("latin-1") in _VRS
    return ExplicitVRLittleEndian if explicit else ImplicitVRLittleEndian


def read_header(
    transfer_syntax_uid: str, meta: bytes, dataset: bytes | memoryview, max_inflated: int
) -> Header:
    """Parse the identifying tags of an encoded instance.

    Parameters
    ----------
    transfer_syntax_uid
        The transfer syntax of `dataset`, as its file meta group names it.
    meta
        Preamble, prefix and file meta group, as from `encode_file_meta`.
    dataset
        The dataset as received, in the transfer syntax the meta names.
    max_inflated
        A deflated dataset that inflates beyond this many bytes is refused.

    Raises
    ------
    InvalidInstance
        The header cannot be parsed or a UID is missing or malformed.
    """
    if transfer_syntax_uid == DeflatedExplicitVRLittleEndian:
        dataset = inflate_bounded(dataset, _DEFLATE_HEAD, max_inflated)
        explicit = dcmread(BytesIO(meta)).file_meta
        explicit.TransferSyntaxUID = ExplicitVRLittleEndian
        meta = encode_file_meta(explicit)
    scanned = _scanned(transfer_syntax_uid, dataset)
    ds = scanned if scanned is not None else _parse(meta, dataset)
    uids = {}
    for keyword in _REQUIRED:
        value = str(ds.get(keyword, "") or "")
        if not is_valid_uid(value):
            raise InvalidInstance(f"{keyword} missing or not a valid UID")
        uids[keyword] = value
    return Header(
        study_uid=uids["StudyInstanceUID"],
        series_uid=uids["SeriesInstanceUID"],
        sop_instance_uid=uids["SOPInstanceUID"],
        sop_class_uid=uids["SOPClassUID"],
        modality=_short_text(ds.get("Modality"), 16),
        body_part=_short_text(ds.get("BodyPartExamined"), 64),
        expected_instances=_count(ds.get("NumberOfStudyRelatedInstances")),
        view_position=_short_text(ds.get("ViewPosition"), 16),
        series_description=_short_text(ds.get("SeriesDescription"), 64),
        manufacturer=_short_text(ds.get("Manufacturer"), 64),
    )


def _scanned(transfer_syntax_uid: str, dataset: bytes | memoryview) -> dict[str, str] | None:
    """`scan_tags`' values when it reads them all (a deflated dataset is inflated by now)."""
    syntax = UID(transfer_syntax_uid)
    if syntax == DeflatedExplicitVRLittleEndian:
        explicit = True
    elif syntax.is_transfer_syntax and syntax.is_little_endian:
        explicit = not syntax.is_implicit_VR
    else:
        return None
    found = scan_tags(dataset, explicit)
    if found is None or not all(found.get(k) for k in _REQUIRED):
        return None
    return found


def _parse(meta: bytes, dataset: bytes | memoryview) -> Dataset:
    """The header, every element before Pixel Data decoded, from the first bytes when they
    hold it all.

    Everything is decoded, not only the tags a row needs: what the walk of `tag_scan` could
    not read (an unknown VR, say) must not pass unread, or the job that meets it while
    copying the patient module into the SR fails every attempt. Copying and parsing a whole
    8 MB radiograph to reach its header costs more than the header: a prefix in which
    pydicom reaches Pixel Data holds the header; otherwise the whole is read.
    """
    if len(dataset) > _HEAD:
        prefix = BytesIO(meta + bytes(dataset[:_HEAD]))
        try:
            ds = _decoded(dcmread(prefix, stop_before_pixels=True))
            # Only if pydicom stopped at Pixel Data before the prefix's end: one that ends
            # on an element boundary, or inside a last value it reads short, holds less.
            if prefix.tell() < len(prefix.getbuffer()) and all(ds.get(k) for k in _REQUIRED):
                return ds
        except Exception:  # a prefix may end anywhere: try the whole dataset
            pass
    try:
        return _decoded(dcmread(_Joined(meta, dataset), stop_before_pixels=True))
    except Exception as exc:  # pydicom raises many types for malformed data
        raise InvalidInstance(f"cannot parse dataset: {type(exc).__name__}") from None


class _Joined(io.RawIOBase):
    """`meta` then `dataset` read as one file, neither copied.

    ``BytesIO(meta + bytes(dataset))`` made two copies of a dataset pydicom could not reach
    the end of the header of in its first bytes: a peer's 50 MB store with a large element
    before Pixel Data held three times its size while the header was read.
    """

    def __init__(self, meta: bytes, dataset: bytes | memoryview) -> None:
        super().__init__()
        self._parts = (memoryview(meta), memoryview(dataset).cast("B"))
        self._size = len(self._parts[0]) + len(self._parts[1])
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._size}[whence]
        self._position = max(0, base + offset)
        return self._position

    def read(self, size: int = -1) -> bytes:
        # One copy of what is asked for (RawIOBase's read fills a bytearray, then copies it).
        end = self._size if size is None or size < 0 else min(self._size, self._position + size)
        first = len(self._parts[0])
        start, self._position = self._position, max(self._position, end)
        if start >= first:
            return bytes(self._parts[1][start - first : end - first])
        if end <= first:
            return bytes(self._parts[0][start:end])
        return bytes(self._parts[0][start:]) + bytes(self._parts[1][: end - first])

    def readinto(self, buffer: Any) -> int:
        target = memoryview(buffer).cast("B")
        done = 0
        first = len(self._parts[0])
        while done < len(target) and self._position < self._size:
            part, start = (
                (self._parts[0], self._position)
                if self._position < first
                else (self._parts[1], self._position - first)
            )
            count = min(len(target) - done, len(part) - start)
            target[done : done + count] = part[start : start + count]
            done += count
            self._position += count
        return done


def _decoded(ds: Dataset) -> Dataset:
    """`ds` with every element decoded now, in sequences too: pydicom decodes lazily, so a
    corrupt value (an unknown VR, say) would otherwise raise later, outside the parse's
    error handling."""
    ds.walk(lambda _dataset, _element: None)
    return ds


def _count(value: object) -> int | None:
    try:
        count = int(str(value))
    except ValueError:
        return None
    return count if 0 < count < 1_000_000 else None


def _short_text(value: object, limit: int) -> str | None:
    text = str(value or "").strip()
    return text[:limit] or None
