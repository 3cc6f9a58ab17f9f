"""Reading the few tags an instance row needs from the encoded bytes, without decoding pixels."""

from __future__ import annotations

from dataclasses import dataclass
from io import BytesIO

from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from dicomai.errors import InvalidInstance
from dicomai.ingest.limits import inflate_bounded
from dicomai.uids import is_valid_uid

_TAGS = [
    "SpecificCharacterSet",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "SOPClassUID",
    "Modality",
    "BodyPartExamined",
    "SeriesDescription",
    "ViewPosition",
    "NumberOfStudyRelatedInstances",
]

PREAMBLE = b"\x00" * 128 + b"DICM"
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


def encode_file_meta(file_meta: FileMetaDataset) -> bytes:
    """The File Meta Information group (PS3.10 §7.1), preceded by preamble and prefix."""
    buffer = BytesIO()
    buffer.write(PREAMBLE)
    write_file_meta_info(buffer, file_meta, enforce_standard=True)  # type: ignore[arg-type]
    return buffer.getvalue()


def read_header(
    file_meta: FileMetaDataset, meta: bytes, dataset: bytes | memoryview, max_inflated: int
) -> Header:
    """Parse the identifying tags of an encoded instance.

    Parameters
    ----------
    file_meta
        The file meta group of the instance.
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
    if file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian:
        dataset = inflate_bounded(dataset, _DEFLATE_HEAD, max_inflated)
        explicit = FileMetaDataset(file_meta)
        explicit.TransferSyntaxUID = ExplicitVRLittleEndian
        meta = encode_file_meta(explicit)
    ds = _parse(meta, dataset)
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
    )


def _parse(meta: bytes, dataset: bytes | memoryview) -> Dataset:
    """The identifying tags, read from the first bytes when they hold them all.

    Copying and walking a whole 8 MB radiograph to find six tags before its pixel data
    costs more than the rest of the header; a prefix that ends mid-element raises, and one
    that happens to end on an element boundary lacks a UID: both fall back to the whole.
    """
    if len(dataset) > _HEAD:
        try:
            ds = _converted(
                dcmread(
                    BytesIO(meta + bytes(dataset[:_HEAD])),
                    stop_before_pixels=True,
                    specific_tags=_TAGS,
                )
            )
            if all(ds.get(k) for k in _REQUIRED):
                return ds
        except Exception:  # a prefix may end anywhere: try the whole dataset
            pass
    try:
        return _converted(
            dcmread(BytesIO(meta + bytes(dataset)), stop_before_pixels=True, specific_tags=_TAGS)
        )
    except Exception as exc:  # pydicom raises many types for malformed data
        raise InvalidInstance(f"cannot parse dataset: {type(exc).__name__}") from None


def _converted(ds: Dataset) -> Dataset:
    """`ds` with every element decoded now: pydicom decodes lazily, so a corrupt value (an
    unknown VR, say) would otherwise raise later, outside the parse's error handling."""
    for _ in ds:
        pass
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
