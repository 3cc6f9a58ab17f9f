"""The listener's byte walk reads a header exactly as pydicom does, or leaves it to pydicom."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.data.data_manager import DATA_ROOT
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from dicomai.errors import InvalidInstance
from dicomai.ingest import header as header_module
from dicomai.ingest.header import encode_listener_meta, read_header
from dicomai.ingest.tag_scan import scan_tags

LIMIT = 1 << 30
STUDY, SERIES, SOP = "1.2.3.4", "1.2.3.4.5", "1.2.3.4.5.6"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


def _split(path: Path) -> tuple[str, str, str, bytes] | None:
    """SOP class, SOP instance, transfer syntax and dataset bytes of a Part 10 file."""
    data = path.read_bytes()
    if data[128:132] != b"DICM" or data[136:138] != b"UL":
        return None
    (length,) = struct.unpack_from("<I", data, 140)
    try:
        meta = dcmread(path, stop_before_pixels=True).file_meta
        classes = str(meta.MediaStorageSOPClassUID), str(meta.MediaStorageSOPInstanceUID)
        syntax = str(meta.TransferSyntaxUID)
    except Exception:
        return None
    return classes[0], classes[1], syntax, data[144 + length :]


def _outcome(syntax: str, meta: bytes, dataset: bytes) -> object:
    try:
        return read_header(syntax, meta, dataset, LIMIT)
    except InvalidInstance as error:
        return f"refused: {error}"


def _both(monkeypatch: pytest.MonkeyPatch, syntax: str, dataset: bytes) -> tuple[object, object]:
    meta = encode_listener_meta(CT_IMAGE, SOP, syntax, "TEST")
    fast = _outcome(syntax, meta, dataset)
    with monkeypatch.context() as patched:
        patched.setattr(header_module, "_scanned", lambda *_: None)
        slow = _outcome(syntax, meta, dataset)
    return fast, slow


def test_every_sample_file_gives_the_header_pydicom_gives(monkeypatch: pytest.MonkeyPatch) -> None:
    scanned = 0
    # The files pydicom installs; get_testdata_files would try to download the others.
    for name in sorted((Path(DATA_ROOT) / "test_files").rglob("*.dcm")):
        parts = _split(Path(name))
        if parts is None:
            continue
        sop_class, sop_uid, syntax, dataset = parts
        # The listener takes these from the C-STORE request, which always has them.
        meta = encode_listener_meta(sop_class or CT_IMAGE, sop_uid or SOP, syntax, "TEST")
        fast = _outcome(syntax, meta, dataset)
        with monkeypatch.context() as patched:
            patched.setattr(header_module, "_scanned", lambda *_: None)
            slow = _outcome(syntax, meta, dataset)
        assert fast == slow, name
        if header_module._scanned(syntax, dataset) is not None:
            scanned += 1
    # The walk must be what answers for most of them, or this test proves nothing.
    assert scanned >= 40, scanned


def test_a_ct_slice_is_read_by_the_walk() -> None:
    parts = _split(Path(get_testdata_file("CT_small.dcm")))
    assert parts is not None
    found = scan_tags(parts[3], explicit=True)
    assert found is not None
    reference = dcmread(get_testdata_file("CT_small.dcm"))
    assert found["StudyInstanceUID"] == reference.StudyInstanceUID
    assert found["SOPInstanceUID"] == reference.SOPInstanceUID
    assert found["Modality"] == "CT"


def _element(tag: int, vr: bytes, value: bytes, explicit: bool = True) -> bytes:
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF)
    if not explicit:
        return head + struct.pack("<I", len(value)) + value
    if vr in (b"SQ", b"OB", b"UN", b"UT"):
        return head + vr + b"\0\0" + struct.pack("<I", len(value)) + value
    return head + vr + struct.pack("<H", len(value)) + value


def _undefined_sequence(tag: int, items: list[bytes], explicit: bool = True) -> bytes:
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF)
    head += (b"SQ\0\0" if explicit else b"") + b"\xff\xff\xff\xff"
    body = b"".join(
        struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
        + item
        + struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
        for item in items
    )
    return head + body + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)


def _dataset(explicit: bool = True, modality: bytes = b"CT", extra: bytes = b"") -> bytes:
    def pad(value: bytes, fill: bytes) -> bytes:
        return value + fill if len(value) % 2 else value

    nested = _element(0x00081150, b"UI", pad(b"1.2.9", b"\0"), explicit)
    return b"".join(
        [
            _element(0x00080016, b"UI", pad(CT_IMAGE.encode(), b"\0"), explicit),
            _element(0x00080018, b"UI", pad(SOP.encode(), b"\0"), explicit),
            _element(0x00080060, b"CS", pad(modality, b" "), explicit),
            _undefined_sequence(0x00081140, [nested, nested], explicit),
            _element(0x0008103E, b"LO", pad(b" chest  ", b" "), explicit),
            _element(0x0020000D, b"UI", pad(STUDY.encode(), b"\0"), explicit),
            _element(0x0020000E, b"UI", pad(SERIES.encode(), b"\0"), explicit),
            extra,
            _element(0x7FE00010, b"OB", b"\0" * 16, explicit),
        ]
    )


@pytest.mark.parametrize(
    ("syntax", "explicit"), [(ExplicitVRLittleEndian, True), (ImplicitVRLittleEndian, False)]
)
def test_undefined_length_sequences_are_walked_through(
    monkeypatch: pytest.MonkeyPatch, syntax: str, explicit: bool
) -> None:
    dataset = _dataset(explicit)
    found = scan_tags(dataset, explicit)
    assert found is not None
    assert found["SeriesInstanceUID"] == SERIES
    assert found["SeriesDescription"] == "chest"
    fast, slow = _both(monkeypatch, syntax, dataset)
    assert fast == slow


@pytest.mark.parametrize(
    ("case", "dataset"),
    [
        ("two values", _dataset(modality=b"CT\\MR")),
        ("an escape sequence", _dataset(modality=b"\x1b$B")),
        ("a NUL-padded text", _dataset(modality=b"CT\0\0")),
        ("a decimal count", _dataset(extra=_element(0x00201208, b"IS", b"12.0"))),
        ("an unknown VR", _dataset(extra=_element(0x00280010, b"XX", b"\0\2"))),
        ("a value past the end", _dataset()[: _dataset().index(SERIES.encode()) + 3]),
    ],
)
def test_what_pydicom_might_read_otherwise_is_left_to_it(
    monkeypatch: pytest.MonkeyPatch, case: str, dataset: bytes
) -> None:
    assert scan_tags(dataset, explicit=True) is None, case
    fast, slow = _both(monkeypatch, ExplicitVRLittleEndian, dataset)
    assert fast == slow, case


@pytest.mark.parametrize("syntax", [ExplicitVRBigEndian, "1.2.3.999"])
def test_big_endian_and_unknown_syntaxes_are_left_to_pydicom(syntax: str) -> None:
    assert header_module._scanned(syntax, _dataset()) is None


def test_an_inflated_deflate_dataset_is_walked_as_explicit() -> None:
    assert header_module._scanned(DeflatedExplicitVRLittleEndian, _dataset()) is not None


@pytest.mark.parametrize("lengths", ["defined", "undefined", "undefined, defined item"])
def test_an_unknown_vr_inside_a_sequence_item_is_refused(lengths: str) -> None:
    # An item's element whose VR pydicom cannot decode: stored, it failed the job later.
    bad = struct.pack("<HH", 0x0010, 0x0010) + b"ZQ" + struct.pack("<H", 4) + b"DOE^"
    item = struct.pack("<HHI", 0xFFFE, 0xE000, len(bad)) + bad
    if lengths == "defined":
        sequence = _element(0x00081140, b"SQ", item)
    elif lengths == "undefined":
        sequence = _undefined_sequence(0x00081140, [bad])
    else:
        head = struct.pack("<HH", 0x0008, 0x1140) + b"SQ\0\0" + b"\xff\xff\xff\xff"
        sequence = head + item + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    dataset = _dataset(extra=sequence)
    assert scan_tags(dataset, explicit=True) is None  # left to pydicom, which cannot read it
    meta = encode_listener_meta(CT_IMAGE, SOP, ExplicitVRLittleEndian, "CT1")
    with pytest.raises(InvalidInstance, match="cannot parse dataset"):
        read_header(ExplicitVRLittleEndian, meta, dataset, 1 << 30)


def test_a_header_pydicom_must_read_whole_is_not_copied_to_read_it() -> None:
    # A large private element before Pixel Data, and a header the walk leaves to pydicom (a
    # second character set): the dataset was copied twice, a peer's 50 MB store held 150 MB.
    import tracemalloc

    from pydicom import Dataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    size = 8 << 20
    ds = Dataset()
    ds.SpecificCharacterSet = ["ISO_IR 100", "ISO_IR 192"]
    ds.SOPClassUID, ds.SOPInstanceUID = CT_IMAGE, SOP
    ds.StudyInstanceUID, ds.SeriesInstanceUID = STUDY, SERIES
    ds.add_new(0x00091010, "LO", "VENDOR")
    ds.add_new(0x00091011, "OB", bytes(size))
    ds.BitsAllocated = 8
    ds.add_new(0x7FE00010, "OB", bytes(16))
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, ds)
    dataset = buffer.getvalue()
    meta = encode_listener_meta(CT_IMAGE, SOP, ExplicitVRLittleEndian, "TEST")

    tracemalloc.start()
    try:
        header = read_header(ExplicitVRLittleEndian, meta, dataset, LIMIT)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert header.sop_instance_uid == SOP
    assert peak < 1.5 * size, f"reading the header allocated {peak / size:.1f} times the dataset"
