"""What a peer may send beyond well-formed C-STORE and C-ECHO: titles that are not text, PDUs
that do not decode, requests we do not serve. Each gets an answer on the wire and an audit row,
the log a line without a traceback, and the listener goes on serving."""

from __future__ import annotations

import io
import socket
import time

import pydicom
import pytest
from daemon import Listener
from pynetdicom import AE
from pynetdicom.dimse_primitives import C_FIND
from pynetdicom.dsutils import encode
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import build_context
from pynetdicom.transport import AddressInformation
from servers import sample_file, wait_for

AET = "DICOMAI"
MODALITY = "MODALITY"
CT = "1.2.840.10008.5.1.4.1.1.2"
A_ASSOCIATE_RJ, A_ABORT = 0x03, 0x07


@pytest.fixture(scope="module")
def listener(tmp_path_factory: pytest.TempPathFactory):
    peers = [{"ae_title": MODALITY, "hosts": ["127.0.0.1"]}]
    with Listener(tmp_path_factory.mktemp("wire"), AET, peers) as daemon:
        yield daemon


def association_request(port: int) -> bytearray:
    """A well-formed A-ASSOCIATE-RQ from MODALITY proposing CT Image Storage."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = MODALITY
    primitive.called_ae_title = AET
    primitive.calling_presentation_address = AddressInformation("127.0.0.1", 1)
    primitive.called_presentation_address = AddressInformation("127.0.0.1", port)
    context = build_context(CT)
    context.context_id = 1
    primitive.presentation_context_definition_list = [context]
    length = MaximumLengthNotification()
    length.maximum_length_received = 16384
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = "1.2.3.4"
    primitive.user_information = [length, implementation]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return bytearray(pdu.encode())


def answer_to(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(request)
        return sock.recv(10)


def audited(listener: Listener, action: str) -> list[tuple[str, str, str]]:
    return listener.query(
        "SELECT actor, object_id, detail FROM audit_events WHERE action = :a ORDER BY id",
        a=action,
    )


def stores(listener: Listener) -> bool:
    ae = AE(ae_title=MODALITY)
    ae.add_requested_context(CT)
    assoc = ae.associate("127.0.0.1", listener.port, ae_title=AET)
    assert assoc.is_established
    status = assoc.send_c_store(pydicom.dcmread(sample_file("CT_small.dcm")))
    assoc.release()
    return bool(status) and status.Status == 0


def no_traceback(listener: Listener) -> None:
    log = listener.log_path.read_text()
    assert "Traceback" not in log, log[log.index("Traceback") - 500 :][:3000]


@pytest.mark.parametrize(
    ("place", "title", "shown"),
    [
        (slice(26, 42), "MODÄLITY".encode("latin-1"), "MOD\\xc4LITY"),
        (slice(26, 42), b"MODALITY\x1b[2J", "MODALITY\\x1b[2J"),
        (slice(10, 26), "DICÖMAI".encode("latin-1"), MODALITY),
    ],
    ids=["calling-latin1", "calling-escape", "called-latin1"],
)
def test_titles_that_are_not_text_are_rejected_as_unknown_and_audited(
    listener: Listener, place: slice, title: bytes, shown: str
) -> None:
    before = len(audited(listener, "association.rejected"))
    request = association_request(listener.port)
    request[place] = title.ljust(16)
    answer = answer_to(listener.port, bytes(request))
    # A-ASSOCIATE-RJ, rejected permanent, by the service user: calling AE title not recognised
    # (3), or called AE title not recognised (7) (PS3.8 Table 9-21).
    assert answer[0] == A_ASSOCIATE_RJ, answer
    assert answer[7:10] == bytes([1, 1, 7 if place.start == 10 else 3]), answer
    rows = audited(listener, "association.rejected")[before:]
    assert len(rows) == 1
    actor, address, detail = rows[0]
    assert (actor, address) == (shown, "127.0.0.1")
    assert "not ASCII text" in detail
    assert "\x1b" not in listener.log_path.read_text()
    no_traceback(listener)
    assert stores(listener), "the listener must go on serving known senders"


def test_a_request_that_does_not_decode_is_aborted_and_audited(listener: Listener) -> None:
    before = len(audited(listener, "association.aborted"))
    request = association_request(listener.port)
    request[74] = 0x99  # no such item type after the application context
    assert answer_to(listener.port, bytes(request))[0] == A_ABORT
    request = association_request(listener.port)
    at = request.index(CT.encode())
    request[at + 2] = 0xFF  # a UID that is not text
    assert answer_to(listener.port, bytes(request))[0] == A_ABORT
    rows = audited(listener, "association.aborted")[before:]  # committed before the abort
    assert len(rows) == 2
    assert all("malformed A-ASSOCIATE-RQ" in detail for _, _, detail in rows)
    no_traceback(listener)
    assert stores(listener)


def test_c_find_on_a_storage_context_is_answered_unrecognised_and_audited(
    listener: Listener,
) -> None:
    before = len(audited(listener, "request.refused"))
    ae = AE(ae_title=MODALITY)
    ae.add_requested_context(CT)
    assoc = ae.associate("127.0.0.1", listener.port, ae_title=AET)
    assert assoc.is_established
    request = C_FIND()
    request.MessageID = 7
    request.AffectedSOPClassUID = CT
    request.Priority = 2
    query = pydicom.Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.PatientName = "*"
    request.Identifier = io.BytesIO(encode(query, True, True))
    # As pynetdicom's own send_* methods do: hold the association's reactor, which would
    # otherwise take the response off the queue.
    assoc._reactor_checkpoint.clear()
    while not assoc._is_paused:
        time.sleep(0.001)
    try:
        assoc.dimse.send_msg(request, 1)
        _, response = assoc.dimse.get_msg(block=True)
    finally:
        assoc._reactor_checkpoint.set()
    assert isinstance(response, C_FIND)
    assert response.Status == 0x0211  # unrecognised operation (PS3.7 C.4)
    assert response.MessageIDBeingRespondedTo == 7
    status = assoc.send_c_store(pydicom.dcmread(sample_file("CT_small.dcm")))
    assert status and status.Status == 0, "the association goes on after the refusal"
    assoc.release()
    rows = audited(listener, "request.refused")[before:]
    assert [(actor, address) for actor, address, _ in rows] == [(MODALITY, "127.0.0.1")]
    assert "C-FIND" in rows[0][2]
    no_traceback(listener)


def test_a_tls_client_on_the_plain_port_gets_one_line_and_an_audit_row(
    listener: Listener,
) -> None:
    before = len(audited(listener, "association.rejected"))
    lines = len(listener.log_path.read_text().splitlines())
    # The start of a TLS ClientHello: handshake record, TLS 1.0 framing.
    assert answer_to(listener.port, bytes.fromhex("160301020001") + bytes(64)) == b""
    rows = audited(listener, "association.rejected")[before:]
    assert len(rows) == 1 and "TLS client on a plain port" in rows[0][2]
    wait_for(lambda: "TLS client" in listener.log_path.read_text(), 10, "the refusal in the log")
    new = listener.log_path.read_text().splitlines()[lines:]
    assert len([line for line in new if "127.0.0.1" in line or "PDU" in line]) == 1, new
    assert stores(listener)


def _item(kind: int, payload: bytes) -> bytes:
    return bytes([kind, 0]) + len(payload).to_bytes(2, "big") + payload


def test_an_unknown_callers_huge_request_is_rejected_without_a_flood_of_log(
    listener: Listener,
) -> None:
    # A megabyte of request from a caller not on the allow-list (thousands of bogus transfer
    # syntaxes) was decoded in full first: six seconds of CPU, six megabytes of warnings.
    syntaxes = b"".join(_item(0x40, b"1.2.840.10008.9.%d" % i) for i in range(1000, 3600))
    contexts = b"".join(
        _item(0x20, bytes([2 * k + 1, 0, 0, 0]) + _item(0x30, CT.encode()) + syntaxes)
        for k in range(15)
    )
    user = _item(0x50, _item(0x51, (16384).to_bytes(4, "big")) + _item(0x52, b"1.2.3.4"))
    body = (
        (1).to_bytes(2, "big") + bytes(2) + AET.encode().ljust(16) + b"NOBODY".ljust(16)
        + bytes(32) + _item(0x10, b"1.2.840.10008.3.1.1.1") + contexts + user
    )  # fmt: skip
    request = bytes([0x01, 0]) + len(body).to_bytes(4, "big") + body
    assert len(request) > 900_000
    lines = len(listener.log().splitlines())
    before = len(audited(listener, "association.rejected"))

    answer = answer_to(listener.port, request)
    assert answer[:1] == bytes([A_ASSOCIATE_RJ]), answer
    rows = wait_for(
        lambda: audited(listener, "association.rejected")[before:], 30, "the rejection's row"
    )
    assert rows[0][0] == "NOBODY" and "not in allow-list" in rows[0][2], rows
    logged = listener.log().splitlines()[lines:]
    assert len(logged) < 10, f"{len(logged)} lines logged, first: {logged[:3]}"
    assert stores(listener), "the listener stopped serving the allowed sender"
