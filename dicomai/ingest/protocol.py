"""What a peer may say on the wire beyond C-STORE and C-ECHO: malformed association requests and
DIMSE requests we do not serve each get an answer and an audit row, not a library traceback."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from pynetdicom import evt
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from sqlalchemy.orm import Session, sessionmaker

from dicomai.audit import Action
from dicomai.errors import DicomaiError
from dicomai.ingest.access import HEALTH_AE_TITLE, AccessPolicy
from dicomai.ingest.refusals import audit_refusal

log = logging.getLogger(__name__)

# PS3.7 C.4: "the operation is not one of those agreed between the DIMSE-service-users".
UNRECOGNIZED_OPERATION = 0x0211
# A-ASSOCIATE-RQ (PS3.8 9.3.2): called AE title in bytes 10-25, calling AE title in 26-41.
_CALLED, _CALLING = slice(10, 26), slice(26, 42)
# Its fixed part (through the reserved 32 bytes), then variable items: type, reserved, length.
_FIXED = 74
_PRESENTATION_CONTEXT = 0x20


class MalformedPDU(DicomaiError):
    """A peer sent a PDU that cannot be decoded; pynetdicom aborts the association."""


def guard_protocol(event: evt.Event, sessions: sessionmaker[Session], policy: AccessPolicy) -> None:
    """EVT_CONN_OPEN handler: wrap the association's PDU decoding and request dispatch."""
    assoc = event.assoc
    decode: Callable[[bytearray], Any] = assoc.dul._decode_pdu
    serve: Callable[[Any, int], None] = assoc._serve_request

    def decode_pdu(bytestream: bytearray) -> Any:
        if bytestream[:1] == b"\x01" and len(bytestream) >= 42:
            bytestream = _mark_bad_titles(assoc, bytestream)
            bytestream = _unless_allowed(bytestream, policy, assoc.requestor.address)
        try:
            return decode(bytestream)
        except Exception as exc:
            # pynetdicom logs what it raises with a traceback: ours is one line.
            kind = _PDU_NAMES.get(bytestream[0], "unknown") if bytestream else "empty"
            reason = f"malformed {kind} PDU ({type(exc).__name__})"
            _audit(sessions, Action.ASSOCIATION_ABORTED, assoc, reason)
            raise MalformedPDU(f"aborting association from {_peer(assoc)}: {reason}") from None

    def serve_request(msg: Any, context_id: int) -> None:
        if isinstance(msg, (C_STORE, C_ECHO)) or not msg.is_valid_request:
            return serve(msg, context_id)
        if context_id not in assoc._accepted_cx:
            return serve(msg, context_id)  # pynetdicom aborts
        operation = type(msg).__name__.replace("_", "-")
        reason = f"{operation} is not served here (only C-STORE and C-ECHO)"
        _audit(sessions, Action.REQUEST_REFUSED, assoc, reason)
        log.warning("refused a request: %s, from %s", reason, _peer(assoc))
        response = type(msg)()
        response.MessageIDBeingRespondedTo = msg.MessageID
        response.Status = UNRECOGNIZED_OPERATION
        sop_class = getattr(msg, "AffectedSOPClassUID", None) or getattr(
            msg, "RequestedSOPClassUID", None
        )
        if sop_class is not None and hasattr(response, "AffectedSOPClassUID"):
            response.AffectedSOPClassUID = sop_class
        assoc.dimse.send_msg(response, context_id)
        return None

    assoc.dul.__dict__["_decode_pdu"] = decode_pdu
    assoc.__dict__["_serve_request"] = serve_request
    transport = assoc.dul.socket
    if transport is None:
        return
    recv: Callable[[int], bytearray] = transport.recv

    def first_recv(nr_bytes: int) -> bytearray:
        transport.recv = recv  # type: ignore[method-assign,assignment]
        data = recv(nr_bytes)
        if not data or data[0] in _PDU_NAMES:
            return data
        # pynetdicom would log each following byte as an unknown PDU type, a dozen lines
        # per attempt of a misconfigured modality.
        reason = "a TLS client on a plain port" if data[0] == 0x16 else "not DICOM"
        log.warning("connection refused: %s (from %s)", reason, assoc.requestor.address)
        _audit(sessions, Action.ASSOCIATION_REJECTED, assoc, reason)
        transport.recv = _closed  # type: ignore[method-assign,assignment]
        transport.close()  # which ends the association at once, as a peer's close would
        return bytearray()

    transport.recv = first_recv  # type: ignore[method-assign]


def _closed(nr_bytes: int) -> bytearray:
    return bytearray()


def drop_connection(assoc: Any) -> None:
    """End a connection before its association request is read, as a peer's close would."""
    transport = assoc.dul.socket
    if transport is not None:
        transport.recv = _closed
        transport.close()


def bad_titles(assoc: Any) -> tuple[str, int, str] | None:
    """If the peer's AE titles were not ASCII text: why, the A-ASSOCIATE-RJ diagnostic (PS3.8
    Table 9-21) and the calling AE title as sent, escaped for the audit row."""
    found: tuple[str, int, str] | None = assoc.__dict__.get("dicomai_bad_titles")
    return found


def _mark_bad_titles(assoc: Any, bytestream: bytearray) -> bytearray:
    """Titles that are not ASCII text make pynetdicom abort with a traceback before any handler
    runs; they are replaced by a placeholder that cannot pass the allow-list, and noted, so that
    the request is rejected (calling AE title not recognised) like any unknown caller's."""
    bad = [
        (name, diagnostic)
        for name, place, diagnostic in (("calling", _CALLING, 0x03), ("called", _CALLED, 0x07))
        if not all(0x20 <= byte < 0x7F and byte != 0x5C for byte in bytestream[place])
    ]
    if not bad:
        return bytestream
    patched = bytearray(bytestream)
    patched[_CALLED] = patched[_CALLING] = b"?".ljust(16)
    reason = " and ".join(name for name, _ in bad) + " AE title not ASCII text"
    raw = "".join(
        chr(byte) if 0x20 <= byte < 0x7F else f"\\x{byte:02x}"
        for byte in bytes(bytestream[_CALLING]).strip(b" ")
    )
    assoc.__dict__["dicomai_bad_titles"] = (reason, bad[0][1], raw)
    return patched


def _unless_allowed(bytestream: bytearray, policy: AccessPolicy, address: str) -> bytearray:
    """An A-ASSOCIATE-RQ of a caller the allow-list refuses, without its presentation contexts.

    pynetdicom decodes the whole request before the allow-list is asked: one request of a
    megabyte from anyone, thousands of bogus transfer syntaxes, took six seconds of CPU and
    wrote six megabytes of warnings before its rejection. Refused all the same (with its
    reason and audit row, by `dicomai.ingest.scp.on_requested`), it needs no contexts.
    `dicomai health`'s probe keeps its own: its Verification context is what lets it in.
    """
    calling = bytes(bytestream[_CALLING]).decode("ascii", "replace").strip()
    if calling == HEALTH_AE_TITLE or policy.check(calling, address).allowed:
        return bytestream
    kept = bytearray(bytestream[:_FIXED])
    position = _FIXED
    while position + 4 <= len(bytestream):
        kind = bytestream[position]
        end = position + 4 + int.from_bytes(bytestream[position + 2 : position + 4], "big")
        if end > len(bytestream):
            return bytestream  # malformed: pynetdicom's decoding says so
        if kind != _PRESENTATION_CONTEXT:
            kept += bytestream[position:end]
        position = end
    kept[2:6] = (len(kept) - 6).to_bytes(4, "big")
    return kept


def _audit(sessions: sessionmaker[Session], action: Action, assoc: Any, reason: str) -> None:
    audit_refusal(sessions, action, _calling(assoc), assoc.requestor.address, reason)


def _calling(assoc: Any) -> str:
    try:
        return str(assoc.requestor.ae_title or "") or "unknown"
    except Exception:  # no request decoded yet
        return "unknown"


def _peer(assoc: Any) -> str:
    return f"{_calling(assoc)} at {assoc.requestor.address}"


_PDU_NAMES = {
    0x01: "A-ASSOCIATE-RQ",
    0x02: "A-ASSOCIATE-AC",
    0x03: "A-ASSOCIATE-RJ",
    0x04: "P-DATA-TF",
    0x05: "A-RELEASE-RQ",
    0x06: "A-RELEASE-RP",
    0x07: "A-ABORT",
}
