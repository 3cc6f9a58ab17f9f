"""The DICOM listener: association control, C-ECHO and C-STORE, bound to spool and database."""

from __future__ import annotations

import hashlib
import logging
from typing import Any, cast

from pydicom.dataset import FileMetaDataset
from pydicom.uid import UID
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.sop_class import _STORAGE_CLASSES, Verification  # type: ignore[attr-defined]
from sqlalchemy.orm import Session, sessionmaker

from dicomai.audit import Action, record
from dicomai.config import Settings
from dicomai.errors import InvalidInstance, StorageUnavailable
from dicomai.ingest.access import AccessPolicy, Decision
from dicomai.ingest.header import encode_file_meta, read_header
from dicomai.ingest.limits import Limits, bound_reads, reset_dataset_count
from dicomai.ingest.recorder import Received, is_known, mark_association_ended, record_instance
from dicomai.ingest.spool import Spool
from dicomai.metrics import (
    OPEN_ASSOCIATIONS,
    REJECTED_ASSOCIATIONS,
    STORE_SECONDS,
    STORED_BYTES,
    STORES,
)
from dicomai.sockets import set_nodelay
from dicomai.uids import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

log = logging.getLogger(__name__)

# PS3.4 Table B.2-1 and PS3.7 Annex C status codes.
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000


def build_ae(settings: Settings) -> AE:
    """An AE that accepts every storage SOP class in every transfer syntax, and Verification."""
    ae = AE(ae_title=settings.ingest.ae_title)
    ae.maximum_pdu_size = settings.ingest.max_pdu
    ae.require_called_aet = True
    ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
    for uid in _STORAGE_CLASSES.values():
        ae.add_supported_context(uid, ALL_TRANSFER_SYNTAXES)
    return ae


def handlers(
    settings: Settings, spool: Spool, sessions: sessionmaker[Session]
) -> list[tuple[Any, ...]]:
    """The event handlers of the listener, bound to their dependencies."""
    policy = AccessPolicy(settings.ingest.peers, settings.ingest.allow_any)
    limits = Limits(settings.ingest.max_pdu, settings.ingest.max_dataset_mb << 20)
    return [
        (evt.EVT_CONN_OPEN, on_connection_open, [limits]),
        (evt.EVT_CONN_CLOSE, on_connection_close),
        (evt.EVT_REQUESTED, on_requested, [policy, settings.ingest.ae_title, sessions]),
        (evt.EVT_C_ECHO, on_echo),
        (evt.EVT_C_STORE, on_store, [spool, sessions, limits]),
        (evt.EVT_RELEASED, on_association_end, [sessions]),
        (evt.EVT_ABORTED, on_association_end, [sessions]),
    ]


def on_association_end(event: evt.Event, sessions: sessionmaker[Session]) -> None:
    """Mark the studies this association stored into, for completion at association end."""
    studies: set[str] = getattr(event.assoc, "dicomai_studies", set())
    try:
        mark_association_ended(sessions, studies)
    except Exception as exc:  # the quiet period still completes these studies
        log.error("could not record association end: %s", type(exc).__name__)


def on_connection_open(event: evt.Event, limits: Limits) -> None:
    OPEN_ASSOCIATIONS.inc()
    set_nodelay(event)
    bound_reads(event, limits)


def on_connection_close(event: evt.Event) -> None:
    OPEN_ASSOCIATIONS.dec()


def on_requested(
    event: evt.Event, policy: AccessPolicy, our_title: str, sessions: sessionmaker[Session]
) -> None:
    """Reject a caller not on the allow-list, or calling another AE (PS3.8 Table 9-21)."""
    requestor = event.assoc.requestor
    primitive = cast(A_ASSOCIATE, requestor.primitive)
    calling = primitive.calling_ae_title
    called = primitive.called_ae_title.strip()
    decision = policy.check(calling, requestor.address)
    diagnostic = 0x03  # calling AE title not recognised
    if decision.allowed and called != our_title:
        decision, diagnostic = Decision(False, "called AE title is not ours"), 0x07
    if decision.allowed:
        return
    log.warning(
        "association rejected: %s (%s from %s)", decision.reason, calling, requestor.address
    )
    REJECTED_ASSOCIATIONS.labels(reason=decision.reason).inc()
    # Audited before the peer hears of it, so the row exists once the rejection is seen.
    try:
        with sessions() as session, session.begin():
            record(
                session,
                Action.ASSOCIATION_REJECTED,
                actor=calling,
                object_type="association",
                object_id=requestor.address,
                reason=decision.reason,
            )
    except Exception:  # the rejection stands even if the audit database is down
        log.exception("could not audit a rejected association")
    event.assoc.acse.send_reject(0x01, 0x01, diagnostic)
    # As pynetdicom's own rejections do: wait for the DUL to send the A-ASSOCIATE-RJ,
    # otherwise the socket may close first and the peer sees an abort.
    event.assoc.kill()


def on_echo(event: evt.Event) -> int:
    return SUCCESS


def on_store(
    event: evt.Event, spool: Spool, sessions: sessionmaker[Session], limits: Limits
) -> int:
    """Store one instance durably, then record it; answer Success only after both.

    Every failure is answered with a status, never an exception: pynetdicom would answer
    0xC211 and log a traceback that may hold the dataset.
    """
    calling = event.assoc.requestor.ae_title
    reset_dataset_count(event)
    with STORE_SECONDS.time():
        status = _answer_store(event, spool, sessions, calling, limits)
    STORES.labels(calling_ae=calling, status=f"0x{status:04X}").inc()
    return status


def _answer_store(
    event: evt.Event, spool: Spool, sessions: sessionmaker[Session], calling: str, limits: Limits
) -> int:
    try:
        return _store(event, spool, sessions, calling, limits)
    except InvalidInstance as exc:
        uid = cast(C_STORE, event.request).AffectedSOPInstanceUID
        _audit_rejection(sessions, calling, uid, str(exc))
        log.warning("C-STORE refused from %s: %s", calling, exc)
        return CANNOT_UNDERSTAND
    except StorageUnavailable as exc:
        log.error("C-STORE from %s not stored: %s", calling, exc)
        return OUT_OF_RESOURCES
    except Exception as exc:
        log.error("C-STORE from %s failed: %s", calling, type(exc).__name__)
        return OUT_OF_RESOURCES


def _store(
    event: evt.Event, spool: Spool, sessions: sessionmaker[Session], calling: str, limits: Limits
) -> int:
    request = cast(C_STORE, event.request)
    if request.DataSet is None:
        raise InvalidInstance("C-STORE request without a dataset")
    dataset = request.DataSet.getbuffer()
    file_meta = _file_meta(event)
    meta = encode_file_meta(file_meta)
    header = read_header(file_meta, meta, dataset, limits.max_dataset_bytes)
    if header.sop_instance_uid != request.AffectedSOPInstanceUID:
        raise InvalidInstance("SOPInstanceUID differs from the C-STORE request")
    relative = spool.relative_path(header.study_uid, header.sop_instance_uid)
    if is_known(sessions, header.sop_instance_uid):
        return SUCCESS
    size = spool.write(relative, (meta, dataset))
    STORED_BYTES.inc(size)
    digest = hashlib.sha256(meta)
    digest.update(dataset)
    received = Received(
        header=header,
        transfer_syntax_uid=str(event.context.transfer_syntax),
        path=relative,
        size=size,
        sha256=digest.hexdigest(),
        calling_ae=calling,
    )
    try:
        record_instance(sessions, received)
        # pynetdicom gives handlers no per-association state; the Association object is it.
        event.assoc.__dict__.setdefault("dicomai_studies", set()).add(header.study_uid)
    except Exception as exc:
        # No row, no Success: the file must not outlive the failed commit.
        spool.remove(relative)
        raise StorageUnavailable(f"database: {type(exc).__name__}") from None
    return SUCCESS


def _file_meta(event: evt.Event) -> FileMetaDataset:
    request = cast(C_STORE, event.request)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(request.AffectedSOPClassUID or "")
    meta.MediaStorageSOPInstanceUID = UID(request.AffectedSOPInstanceUID or "")
    meta.TransferSyntaxUID = event.context.transfer_syntax
    meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    meta.SourceApplicationEntityTitle = event.assoc.requestor.ae_title
    return meta


def _audit_rejection(
    sessions: sessionmaker[Session], calling: str, sop_instance_uid: object, reason: str
) -> None:
    try:
        with sessions() as session, session.begin():
            record(
                session,
                Action.INSTANCE_REJECTED,
                actor=calling,
                object_type="instance",
                object_id=str(sop_instance_uid or "")[:128],
                reason=reason,
            )
    except Exception:
        log.exception("could not audit a rejected instance")
