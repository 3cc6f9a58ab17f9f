"""Bounds on what one peer may make the listener hold in memory: PDU, dataset, inflated size."""

from __future__ import annotations

import logging
import ssl
import time
import zlib
from dataclasses import dataclass
from typing import Any

from pynetdicom import evt
from sqlalchemy.orm import Session, sessionmaker

from dicomai.audit import Action
from dicomai.errors import InvalidInstance
from dicomai.ingest.refusals import audit_refusal

log = logging.getLogger(__name__)

# An A-ASSOCIATE-RQ with many presentation contexts exceeds a small negotiated PDU size.
_MIN_PDU_ALLOWANCE = 1 << 20


@dataclass(frozen=True)
class Limits:
    """max_pdu: the PDU size we negotiate; a declared length above it ends the connection.
    read_timeout: seconds the peer has for each read pynetdicom makes of a PDU, its header and
    then its body (request_timeout before the association is established: ARTIM's role)."""

    max_pdu: int
    max_dataset_bytes: int
    read_timeout: float | None = None
    request_timeout: float | None = None

    @property
    def max_pdu_read(self) -> int:
        return max(self.max_pdu, _MIN_PDU_ALLOWANCE)


def bound_reads(
    event: evt.Event, limits: Limits, sessions: sessionmaker[Session] | None = None
) -> None:
    """EVT_CONN_OPEN handler: wrap the socket's reads before the association reads anything.

    pynetdicom reads a PDU of whatever length the peer declares, and gathers a dataset of any
    size in memory. A PDU longer than we negotiated, or more bytes for one dataset than
    `max_dataset_bytes`, closes the connection instead (the peer sees the transport close),
    with a warning and an `association.aborted` audit row (in `sessions`).
    """
    transport = event.assoc.dul.socket
    if transport is None:
        return
    # pynetdicom reads a PDU it has begun with a blocking socket: a peer that sends half of
    # one and stops (or sends a byte now and then) held its thread, and an association slot,
    # until it closed the connection (the DUL's timers only run between reads). A PDU not
    # whole by its deadline ends the connection.
    if transport.socket is not None and limits.read_timeout is not None:
        transport.socket.settimeout(limits.read_timeout)
    counter = event.assoc.__dict__.setdefault("dicomai_bytes", [0])

    def refuse(reason: str) -> bytearray:
        # Returned short, as when the peer closes: pynetdicom ends the association. Raised,
        # the error was logged with pynetdicom's traceback and left no audit row.
        address = event.assoc.requestor.address
        log.warning("connection from %s closed: %s", address, reason)
        if sessions is not None:
            calling = str(getattr(event.assoc.requestor, "ae_title", "") or "") or "unknown"
            audit_refusal(sessions, Action.ASSOCIATION_ABORTED, calling, address, reason)
        return bytearray()

    def recv(nr_bytes: int) -> bytearray:
        if nr_bytes > limits.max_pdu_read:
            return refuse(f"declared PDU length {nr_bytes} exceeds {limits.max_pdu_read}")
        timeout = limits.read_timeout
        if not event.assoc.is_established and limits.request_timeout is not None:
            timeout = limits.request_timeout
        try:
            data = _read_exactly(transport.socket, nr_bytes, timeout, limits.read_timeout)
        except TimeoutError:
            # Returned short, as when the peer closes: pynetdicom ends the association.
            log.warning(
                "%s sent no whole PDU within %g s: connection closed",
                event.assoc.requestor.address,
                timeout,
            )
            return bytearray()
        except ssl.SSLError as exc:
            # A TLS 1.2 peer asking to renegotiate (refused, BCP 195), or a bad record:
            # pynetdicom logged its traceback and left no row.
            return refuse(f"TLS error: {exc.reason or exc}")
        except OSError as exc:
            # Reset by the peer (a modality switched off mid-transfer): its end, as a close.
            log.warning(
                "connection from %s lost: %s",
                event.assoc.requestor.address,
                exc.strerror or type(exc).__name__,
            )
            return bytearray()
        counter[0] += len(data)
        if counter[0] > limits.max_dataset_bytes:
            return refuse(f"dataset exceeds {limits.max_dataset_bytes} bytes")
        return data

    transport.recv = recv  # type: ignore[method-assign]


def _read_exactly(
    sock: Any, nr_bytes: int, timeout: float | None = None, restore: float | None = None
) -> bytearray:
    """Read `nr_bytes` into one buffer; fewer only if the peer closed the connection.

    pynetdicom reads 4 KiB at a time and appends: for a 128 KiB PDU that is 32 calls and
    copies, where `recv_into` a buffer of the right size usually takes one or two.

    Raises
    ------
    TimeoutError
        Not all `nr_bytes` came within `timeout` seconds. The socket's own timeout bounds
        each wait; only once a read comes short is it narrowed to what is left of the
        PDU's time (and set back to `restore` after), so whole PDUs cost no extra calls.
    """
    start = time.monotonic()
    buffer = bytearray(nr_bytes)
    view = memoryview(buffer)
    read = 0
    narrowed = False
    try:
        while read < nr_bytes:
            if read and timeout is not None:
                left = start + timeout - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                sock.settimeout(left)
                narrowed = True
            got = sock.recv_into(view[read:], nr_bytes - read)
            if not got:
                del view
                del buffer[read:]
                break
            read += got
    finally:
        if narrowed:
            sock.settimeout(restore)
    return buffer


def reset_dataset_count(event: evt.Event) -> None:
    """Start counting the next dataset's bytes (called when a C-STORE has been received)."""
    counter = event.assoc.__dict__.get("dicomai_bytes")
    if counter is not None:
        counter[0] = 0


def inflate_bounded(data: bytes | memoryview, keep: int, limit: int) -> bytes:
    """Inflate a Deflated Explicit VR dataset (PS3.5 A.5) and return its first `keep` bytes.

    The whole stream is inflated to measure it, but at most `keep` bytes are held.

    Raises
    ------
    InvalidInstance
        The stream is corrupt, or inflates to more than `limit` bytes (a deflate bomb).
    """
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    head = bytearray()
    total = 0
    chunk = 1 << 20
    pending = bytes(data)
    try:
        while pending:
            out = inflater.decompress(pending, chunk)
            pending = inflater.unconsumed_tail
            total += len(out)
            if total > limit:
                raise InvalidInstance(f"deflated dataset inflates beyond {limit} bytes")
            if len(head) < keep:
                head += out[: keep - len(head)]
            if not out and not pending:
                break
        tail = inflater.flush()
        if total + len(tail) > limit:
            raise InvalidInstance(f"deflated dataset inflates beyond {limit} bytes")
        head += tail[: max(keep - len(head), 0)]
    except zlib.error:
        raise InvalidInstance("deflated dataset is corrupt") from None
    return bytes(head)
