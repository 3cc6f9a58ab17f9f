"""Broken and hostile instances get a clear status and an audit row; nothing partial stays."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pydicom
import pytest
from daemon import Listener
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config
from servers import echoscu, sample_file

AET = "DICOMAI"
MODALITY = "MODALITY"
CT = "1.2.840.10008.5.1.4.1.1.2"


@pytest.fixture(scope="module")
def listener(tmp_path_factory: pytest.TempPathFactory):
    peers = [{"ae_title": MODALITY, "hosts": ["127.0.0.1"]}]
    with Listener(tmp_path_factory.mktemp("bad"), AET, peers) as daemon:
        yield daemon


def send(listener: Listener, dataset: pydicom.Dataset | Path, syntax: str) -> int | None:
    ae = AE(ae_title=MODALITY)
    ae.add_requested_context(CT, syntax)
    assoc = ae.associate("127.0.0.1", listener.port, ae_title=AET)
    assert assoc.is_established
    try:
        status = assoc.send_c_store(dataset)
    finally:
        if assoc.is_established:
            assoc.release()
    return status.Status if status else None


def ct(uid: str) -> pydicom.Dataset:
    ds = pydicom.dcmread(sample_file("CT_small.dcm"))
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
    return ds


def no_partial_files(listener: Listener) -> None:
    leftovers = [p for p in (listener.root / "var" / "spool").rglob(".*.tmp")]
    assert leftovers == [], f"partial files left in the spool: {leftovers}"


def send_raw(listener: Listener, path: Path, syntax: str = ExplicitVRLittleEndian) -> int | None:
    """Send a file's bytes as they are, not re-encoded by pydicom, on a context of `syntax`."""
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        return send(listener, path, syntax)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False


def mislabelled(ds: pydicom.Dataset, implicit: bool, negotiated: str, path: Path) -> bytes:
    """Write `ds` to `path` in implicit or explicit VR under a file meta naming `negotiated`;
    return the dataset's bytes."""
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, implicit
    write_dataset(body, ds)
    head = DicomBytesIO()
    head.is_little_endian, head.is_implicit_VR = True, False
    head.write(b"\0" * 128 + b"DICM")
    ds.file_meta.TransferSyntaxUID = negotiated  # what the sender negotiates
    write_file_meta_info(head, ds.file_meta)
    path.write_bytes(head.getvalue() + body.getvalue())
    return body.getvalue()


def stored_as(listener: Listener, uid: str, syntax: str, body: bytes) -> None:
    """The instance is recorded and stored under `syntax`, its bytes as received, and dcmtk
    reads the file."""
    ((relative, recorded),) = listener.query(
        "SELECT path, transfer_syntax_uid FROM instances WHERE sop_instance_uid = :u", u=uid
    )
    assert recorded == syntax
    stored = listener.root / "var" / "spool" / relative
    assert pydicom.dcmread(stored).file_meta.TransferSyntaxUID == syntax
    dump = subprocess.run(["dcmdump", "-q", str(stored)], capture_output=True, text=True)
    assert dump.returncode == 0 and "OtherPatientIDsSequence" in dump.stdout, dump.stderr
    assert stored.read_bytes().endswith(body), "the dataset is stored as received"


def truncated(tmp_path: Path, uid: str, keep: float) -> Path:
    path = tmp_path / f"{uid}.dcm"
    ct(uid).save_as(path, enforce_file_format=True)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    return path


def test_dataset_truncated_in_its_header_is_refused(listener: Listener, tmp_path: Path) -> None:
    status = send_raw(listener, truncated(tmp_path, "1.2.826.0.1.9001", keep=0.02))
    assert status in (0xC000, None)
    assert listener.query(
        "SELECT count(*) FROM instances WHERE sop_instance_uid = '1.2.826.0.1.9001'"
    ) == [(0,)]
    no_partial_files(listener)
    assert echoscu(listener.port, aet=MODALITY, aec=AET).returncode == 0


def test_an_element_with_an_unknown_vr_is_refused_at_the_door(
    listener: Listener, tmp_path: Path
) -> None:
    # Accepted before, it failed every attempt of its job when the SR copied the patient
    # module: no report, no "not evaluated", a traceback per attempt.
    uid = "1.2.826.0.1.9004"
    path = tmp_path / "bad-vr.dcm"
    ds = ct(uid)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(path, enforce_file_format=True)
    data = bytearray(path.read_bytes())
    name = data.find(b"\x10\x00\x10\x00PN")  # (0010,0010) Patient's Name, explicit VR
    assert name > 0
    data[name + 4 : name + 6] = b"ZQ"
    path.write_bytes(bytes(data))

    assert send_raw(listener, path) == 0xC000
    assert listener.query("SELECT count(*) FROM instances WHERE sop_instance_uid = :u", u=uid) == [
        (0,)
    ]
    assert listener.query(
        "SELECT count(*) FROM audit_events WHERE action = 'instance.rejected' AND object_id = :u",
        u=uid,
    ) == [(1,)]
    no_partial_files(listener)


def test_dataset_truncated_in_its_pixels_is_stored_for_the_worker_to_judge(
    listener: Listener, tmp_path: Path
) -> None:
    assert send_raw(listener, truncated(tmp_path, "1.2.826.0.1.9003", keep=0.5)) == 0x0000
    no_partial_files(listener)


@pytest.mark.parametrize(
    ("case", "change"),
    [
        ("no pixel data", lambda ds: delattr(ds, "PixelData")),
        ("short pixel data", lambda ds: setattr(ds, "PixelData", ds.PixelData[:100])),
        ("absurd dimensions", lambda ds: setattr(ds, "Rows", 65535)),
        (
            "SQL metacharacters",
            lambda ds: setattr(ds, "SeriesDescription", "x'); DROP TABLE instances; --"),
        ),
        (
            "non-ASCII text",
            lambda ds: (
                setattr(ds, "SpecificCharacterSet", "ISO_IR 192"),
                setattr(ds, "PatientName", "Ærøskøbing^Zoë"),
            ),
        ),
        ("invalid date", lambda ds: setattr(ds, "StudyDate", "1970-01-01")),
    ],
)
def test_odd_but_readable_instances_are_stored_for_the_worker_to_judge(
    listener: Listener, case: str, change
) -> None:
    uid = f"1.2.826.0.1.91{abs(hash(case)) % 10**8}"
    ds = ct(uid)
    change(ds)
    assert send(listener, ds, ExplicitVRLittleEndian) == 0x0000, case
    assert listener.query("SELECT count(*) FROM instances WHERE sop_instance_uid = :u", u=uid) == [
        (1,)
    ], case
    assert listener.query("SELECT count(*) FROM instances")[0][0] >= 1, "instances table gone"


def test_missing_identifying_uids_are_refused(listener: Listener) -> None:
    ds = ct("1.2.826.0.1.9002")
    del ds.StudyInstanceUID
    assert send(listener, ds, ImplicitVRLittleEndian) == 0xC000
    reasons = listener.query(
        "SELECT detail FROM audit_events WHERE action = 'instance.rejected' "
        "AND object_id = '1.2.826.0.1.9002'"
    )
    assert reasons and "StudyInstanceUID" in reasons[0][0]
    no_partial_files(listener)


def test_log_never_holds_patient_data(listener: Listener) -> None:
    log = listener.log()
    for value in ("Ærøskøbing", "CompressedSamples^CT1", "1970-01-01", "DROP TABLE"):
        assert value not in log, f"{value!r} leaked into the listener log"


def test_implicit_vr_sent_on_an_explicit_context_is_stored_readable(
    listener: Listener, tmp_path: Path
) -> None:
    """A known vendor fault: Explicit VR Little Endian negotiated, the dataset sent in implicit
    VR. Stored as received, with a file meta that says what the bytes are, so that readers
    stricter than pydicom can read the file."""
    ds = ct("1.2.826.0.1.9071")
    body = mislabelled(ds, True, ExplicitVRLittleEndian, tmp_path / "mislabelled.dcm")

    assert send_raw(listener, tmp_path / "mislabelled.dcm") == 0x0000
    stored_as(listener, "1.2.826.0.1.9071", ImplicitVRLittleEndian, body)


def test_explicit_vr_sent_on_an_implicit_context_is_stored_readable(
    listener: Listener, tmp_path: Path
) -> None:
    """pynetdicom sends a file's bytes as they are: an explicit VR file on an Implicit VR
    context. Labelled implicit, dcmtk could not read the file, and pydicom read its sequences
    without their VRs."""
    ds = ct("1.2.826.0.1.9072")
    body = mislabelled(ds, False, ImplicitVRLittleEndian, tmp_path / "mislabelled.dcm")

    assert send_raw(listener, tmp_path / "mislabelled.dcm", ImplicitVRLittleEndian) == 0x0000
    stored_as(listener, "1.2.826.0.1.9072", ExplicitVRLittleEndian, body)
