"""C-STORE SCU: send stored output objects to a PACS over one association."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

from pydicom.dataset import FileMetaDataset
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.presentation import build_context
from pynetdicom.status import code_to_category

from dicomai.errors import DeliveryError
from dicomai.sockets import set_nodelay

# A file is sent as its stored bytes, read in chunks, rather than decoded and encoded again:
# an SR of a 100-image study took a third of a second each way.
_config.STORE_SEND_CHUNKED_DATASET = True


def send_files(
    paths: list[Path],
    *,
    ae_title: str,
    host: str,
    port: int,
    calling_ae: str,
    timeout: float,
    on_sent: Callable[[], None] | None = None,
) -> list[DeliveryError | None]:
    """Send DICOM files over one association; return each file's outcome (None: stored).

    One association for all of a job's objects: opening one per object cost more than the
    objects themselves (a 100-image study has 100 overlays). `timeout` bounds the connection,
    the association's negotiation and each message; `on_sent` is called after each object.
    """
    metas = [read_file_meta_info(path) for path in paths]
    ae = AE(ae_title=calling_ae)
    # pynetdicom waits for a TCP connection without limit by default: a PACS behind a firewall
    # that drops the SYN held the worker for over two minutes an attempt.
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = timeout
    pairs = {(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID) for meta in metas}
    ae.requested_contexts = [build_context(sop, syntax) for sop, syntax in sorted(pairs)]
    where = f"{ae_title}@{host}:{port}"
    answer = _Answer()
    try:
        assoc = ae.associate(
            host,
            port,
            ae_title=ae_title,
            evt_handlers=[
                (evt.EVT_CONN_OPEN, set_nodelay),
                (evt.EVT_CONN_OPEN, answer.connected),
                (evt.EVT_ACSE_RECV, answer.received),
            ],
        )
    except socket.gaierror as exc:
        error = DeliveryError(f"host name {host!r} does not resolve ({exc.strerror or exc})")
        return [error for _ in paths]
    if not assoc.is_established:
        error = DeliveryError(answer.why_not(where, timeout, pairs))
        return [error for _ in paths]
    try:
        outcomes = []
        for path, meta in zip(paths, metas, strict=True):
            outcomes.append(_send_one(assoc, path, meta, where))
            if on_sent is not None:
                on_sent()
        return outcomes
    finally:
        if assoc.is_established:
            assoc.release()


class _Answer:
    """What the peer did with an association request, for a message that says why it failed;
    pynetdicom tells only its log."""

    def __init__(self) -> None:
        self.opened = False
        self.result: int | None = None
        self.reason = ""

    def connected(self, _event: Event) -> None:
        self.opened = True

    def received(self, event: Event) -> None:
        primitive = event.primitive  # type: ignore[attr-defined]
        result = getattr(primitive, "result", None)
        if self.result is None and isinstance(result, int):
            self.result = result
            if result in (1, 2):
                self.reason = f"{primitive.result_str}, {primitive.reason_str}"

    def why_not(self, where: str, timeout: float, pairs: set[tuple[UID, UID]]) -> str:
        if not self.opened:
            return (
                f"no connection to {where} (refused, unreachable, or no answer within "
                f"{timeout:g} s)"
            )
        if self.result in (1, 2):
            return f"{where} rejected the association: {self.reason}"
        if self.result == 0:
            offered = "; ".join(
                f"{sop.name} in {syntax.name}"
                for sop, syntax in sorted(pairs)  # type: ignore[attr-defined]
            )
            return f"{where} accepted none of the presentation contexts offered ({offered})"
        return (
            f"{where} did not answer the association request (aborted, or no reply within "
            f"{timeout:g} s)"
        )


def _send_one(
    assoc: Association, path: Path, meta: FileMetaDataset, where: str
) -> DeliveryError | None:
    if not assoc.is_established:
        return DeliveryError(f"association with {where} ended before this object was sent")
    try:
        status = assoc.send_c_store(path)
    except ValueError:
        # pynetdicom raises when the peer accepted no context for this SOP class and syntax.
        name = meta.MediaStorageSOPClassUID.name
        return DeliveryError(f"{where} accepted no presentation context for {name}")
    except (RuntimeError, OSError):
        # The peer closed or aborted the association between two checks (pynetdicom says
        # RuntimeError) or the socket failed: this object's attempt failed, like the rest.
        return DeliveryError(f"association with {where} lost while sending")
    return _outcome(status, where)


def _outcome(status: object, where: str) -> DeliveryError | None:
    code = getattr(status, "Status", None)
    if code is None:
        return DeliveryError(f"no C-STORE response from {where}")
    # PS3.7 C: a Warning (0001, 0107, 0116, Bxxx) stores the object as a Success does; sent
    # again, it was stored again and then counted failed.
    if code_to_category(code) not in ("Success", "Warning"):
        return DeliveryError(f"{where} answered status 0x{code:04X}")
    return None
