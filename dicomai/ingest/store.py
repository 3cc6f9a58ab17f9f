"""C-STORE: the received instance made durable and recorded before Success is answered."""

from __future__ import annotations

import hashlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, cast

from pynetdicom import evt
from pynetdicom.dimse_primitives import C_STORE
from sqlalchemy.orm import Session, sessionmaker

from dicomai.audit import Action, record
from dicomai.errors import DatabaseUnavailable, InvalidInstance, StorageUnavailable
from dicomai.ingest import transfers
from dicomai.ingest.committer import GroupCommitter
from dicomai.ingest.header import Header, encode_listener_meta, encoded_syntax, read_header
from dicomai.ingest.limits import Limits, reset_dataset_count
from dicomai.ingest.recorder import (
    Received,
    forget_instance,
    known_digest,
    recorded_path,
    recorded_study,
    replace_instance,
)
from dicomai.ingest.same_content import same_content
from dicomai.ingest.spool import RESENDS, NameTaken, Placed, Spool
from dicomai.metrics import STORE_SECONDS, STORED_BYTES, STORES, sender_label

log = logging.getLogger(__name__)

# PS3.4 Table B.2-1 and PS3.7 Annex C status codes.
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
CANNOT_UNDERSTAND = 0xC000

RESEND_POLICIES = ("keep", "replace")

# Shared by the listener's handler threads; hashing holds no lock, so a few suffice.
_HASHER = ThreadPoolExecutor(max_workers=4, thread_name_prefix="digest")
# Below this the hand-over to another thread costs more than the hash (a CT slice: ~0.3 ms).
_HASH_ASIDE_BYTES = 2 << 20


@dataclass
class Storer:
    """The C-STORE handler, bound to the spool, the database and the listener's limits.

    resend_policy
        What a resend of a known SOP Instance UID with *different* content does:
        ``keep`` the first (the default: never discard what a job may have used) or
        ``replace`` it (the study is reopened and gets a new job). Either is audited;
        an identical resend is accepted and recorded once (DESIGN.md rule 3), as is the
        same image in another lossless transfer syntax (`same_content`).
    peers
        The allow-list's calling AE titles (`AccessPolicy.titles`): stores are counted under
        their caller's title if it is one of them, under ``other`` if not (with ``allow_any``
        a sender may call itself anything); None counts each title under its own.
    track_transfers
        Record which association sends which study (`transfers`), for
        ``complete_on_association_end``.
    """

    spool: Spool
    sessions: sessionmaker[Session]
    limits: Limits
    resend_policy: str = "keep"
    committer: GroupCommitter | None = None
    peers: frozenset[str] | None = None
    track_transfers: bool = False

    def __post_init__(self) -> None:
        if self.committer is None:
            self.committer = GroupCommitter(self.sessions)

    def __call__(self, event: evt.Event) -> int:
        """Answer one C-STORE; never raises (pynetdicom would log the dataset with 0xC211)."""
        calling = event.assoc.requestor.ae_title
        reset_dataset_count(event)
        with STORE_SECONDS.time():
            status = self._answer(event, calling)
        if status != SUCCESS:
            # A transfer with a refused instance failed, as an aborted one did: its release
            # must not end its studies (a report on 8 of 20 images went out while the sender,
            # refused 0xA700 below the disk watermark, released to retry later).
            event.assoc.__dict__["dicomai_refused"] = True
        sender = sender_label(calling, self.peers)
        STORES.labels(calling_ae=sender, status=f"0x{status:04X}").inc()
        return status

    def _answer(self, event: evt.Event, calling: str) -> int:
        try:
            return self._store(event, calling)
        except InvalidInstance as exc:
            uid = cast(C_STORE, event.request).AffectedSOPInstanceUID
            self._audit(Action.INSTANCE_REJECTED, calling, str(uid or "")[:128], reason=str(exc))
            log.warning("C-STORE refused from %s: %s", calling, exc)
            return CANNOT_UNDERSTAND
        except StorageUnavailable as exc:
            log.error("C-STORE from %s not stored: %s", calling, exc)
            # An audit row would wait for the same database (its busy timeout again),
            # past the sender's DIMSE timeout: the log has it.
            if not isinstance(exc, DatabaseUnavailable):
                self._audit_refused(event, calling, str(exc))
            return OUT_OF_RESOURCES
        except Exception as exc:
            log.error("C-STORE from %s failed: %s", calling, type(exc).__name__)
            self._audit_refused(event, calling, f"unexpected {type(exc).__name__}")
            return OUT_OF_RESOURCES

    def _audit_refused(self, event: evt.Event, calling: str, reason: str) -> None:
        uid = cast(C_STORE, event.request).AffectedSOPInstanceUID
        self._audit(Action.INSTANCE_REJECTED, calling, str(uid or "")[:128], reason=reason)

    def _store(self, event: evt.Event, calling: str) -> int:
        request = cast(C_STORE, event.request)
        if event.assoc.__dict__.get("dicomai_health_probe"):
            raise InvalidInstance("the health probe's association may not store")
        # pynetdicom picks the service by the request's SOP class, whatever context carried
        # it: a C-STORE on a context negotiated for another class (Verification) is refused.
        if request.AffectedSOPClassUID != event.context.abstract_syntax:
            raise InvalidInstance(
                f"SOP Class {request.AffectedSOPClassUID} sent on a presentation context "
                f"for {event.context.abstract_syntax}"
            )
        if request.DataSet is None:
            raise InvalidInstance("C-STORE request without a dataset")
        dataset = request.DataSet.getbuffer()
        syntax = encoded_syntax(str(event.context.transfer_syntax), dataset)
        meta = encode_listener_meta(
            str(request.AffectedSOPClassUID or ""),
            str(request.AffectedSOPInstanceUID or ""),
            syntax,
            event.assoc.requestor.ae_title,
        )
        header = read_header(syntax, meta, dataset, self.limits.max_dataset_bytes)
        if header.sop_instance_uid != request.AffectedSOPInstanceUID:
            raise InvalidInstance("SOPInstanceUID differs from the C-STORE request")
        if header.sop_class_uid != request.AffectedSOPClassUID:
            # The file meta is written from the request: the file would name another class.
            raise InvalidInstance("SOPClassUID differs from the C-STORE request")
        if self.track_transfers:
            self._begin_transfer(event.assoc, header.study_uid)
        relative = self.spool.relative_path(header.study_uid, header.sop_instance_uid)
        received = Received(
            header=header,
            transfer_syntax_uid=syntax,
            path=relative,
            size=len(meta) + len(dataset),
            sha256="",
            calling_ae=calling,
        )
        known = None
        if not self.spool.path(relative).parent.is_dir():
            # The study's first instance here: one recorded under another study must leave
            # no folder of this one behind. Later instances are not looked up first (a
            # known one's file has the name already, or `_store_new` finds its row naming
            # another folder): the look-up cost a new instance ~8 % of its CPU.
            known = known_digest(self.sessions, header.sop_instance_uid)
            if known is not None:
                # Its row may be committed while its file is not yet durable: should the
                # fsync fail, that store takes both back, and this one must not answer as
                # its resend.
                known = self._settled_digest(received)
        if known is None:
            known = self._store_new(received, meta, dataset)
        if known is not None:
            digest = _content_digest(dataset)
            if known == digest:
                self._audit(
                    Action.INSTANCE_DUPLICATE, calling, header.sop_instance_uid,
                    study_uid=header.study_uid,
                )  # fmt: skip
                return SUCCESS
            if self._same_content(header, meta, dataset):
                # The same image in another transfer syntax (a PACS forwarding it): stored
                # once, as an identical resend is; the syntax says why the digests differ.
                self._audit(
                    Action.INSTANCE_DUPLICATE, calling, header.sop_instance_uid,
                    study_uid=header.study_uid, transfer_syntax=syntax,
                )  # fmt: skip
                return SUCCESS
            if self.resend_policy == "keep":
                aside = self._keep_aside(header, digest, meta, dataset)
                self._audit(
                    Action.INSTANCE_RESEND_KEPT, calling, header.sop_instance_uid,
                    study_uid=header.study_uid, kept_aside=aside, sha256=digest,
                )  # fmt: skip
                return SUCCESS
            if recorded_study(self.sessions, header.sop_instance_uid) != header.study_uid:
                # A study merge or a patient correction: replaced in place, the row kept the
                # old study's file and the new content went to a path no row named.
                raise InvalidInstance(
                    "resent under another Study Instance UID than it was stored with: "
                    "a replace cannot move an instance between studies"
                )
            self._replace(replace(received, sha256=digest), meta, dataset)
        return SUCCESS

    def _begin_transfer(self, assoc: Any, study_uid: str) -> None:
        """Record, at its first instance, that this association sends the study: another
        association's release, in any listener process, must not end it meanwhile."""
        # pynetdicom gives handlers no per-association state; the Association object is it.
        state = assoc.__dict__
        studies = state.setdefault("dicomai_studies", set())
        if study_uid in studies:
            return
        key = state.setdefault("dicomai_transfer", transfers.new_association_key())
        try:
            transfers.begin(self.sessions, key, study_uid)
        except Exception as exc:  # the quiet period still closes the study
            log.error("could not record a transfer: %s", type(exc).__name__)
            return
        studies.add(study_uid)

    def _same_content(self, header: Header, meta: bytes, dataset: memoryview) -> bool:
        """Whether a resend whose digest differs holds the stored instance's content all the
        same (`same_content`): decoded only here, never on a new instance's path."""
        try:
            stored = recorded_path(self.sessions, header.sop_instance_uid)
        except Exception:  # the database: judged different, as before the comparison
            return False
        return stored is not None and same_content(self.spool.path(stored), meta, dataset)

    def _store_new(self, received: Received, meta: bytes, dataset: memoryview) -> str | None:
        """Write, record and make durable a new instance; return only when all three are.

        Returns None, or the digest recorded for the instance if it is known: its file had
        the name already (stored before, or by a concurrent store), or its row names another
        study's folder. The caller treats ours as a resend of it.

        The row is committed while the file and its folder are fsynced, not after: the
        file system journals the three together (on this project's test VM 1.5-4 ms
        against 11-13 ms one after the other). Success still waits for all of them
        (DESIGN.md rule 1). A power loss in between can leave a row whose file is not on
        disk: the sender was not answered, and `dicomai.ingest.recovery` deletes such rows
        at the next start. If the fsyncs fail, the row is deleted again here.
        """
        uid = received.header.sop_instance_uid

        def has_row() -> bool:
            return known_digest(self.sessions, uid) is not None

        for _ in range(_NAMING_TRIES):
            try:
                placed, digest = self._place(received, meta, dataset)
                break
            except NameTaken:
                known = self._settled_digest(received)
                if known is not None:
                    return known
                # A file a crash left without its row, or one a failed store is removing;
                # whether a row has come meanwhile is decided under the file's lock.
                self.spool.remove_orphan(received.path, has_row)
        else:
            raise StorageUnavailable("could not name the instance's file in the spool")
        received = replace(received, sha256=digest)
        try:
            placed.start_sync()
        except BaseException:  # the fsync pool refuses work once the process is exiting
            placed.discard()
            raise
        try:
            assert self.committer is not None
            ours = self.committer.record(received)
        except Exception as exc:
            placed.discard()  # no row, no Success: the file must not outlive the commit
            raise DatabaseUnavailable(f"database: {type(exc).__name__}") from None
        try:
            placed.wait_durable()
        except StorageUnavailable:
            self._undo(received, placed, ours)
            raise
        if not ours:
            if recorded_path(self.sessions, uid) != received.path:
                # Recorded under another study's folder: ours is a resend of it, judged by
                # its digest as any other; the file no row names goes.
                placed.discard()
                return self._settled_digest(received)
            # A row without its file (the name was free) named the instance: ours, durable
            # now, is its content, as a replacing resend's would be.
            self._record_replacement(received)
        STORED_BYTES.inc(placed.size)
        return None

    def _undo(self, received: Received, placed: Placed, ours: bool) -> None:
        """A failed fsync: our row and file go; the lock goes last, so that a concurrent
        store of the instance never takes the row for a durable one."""
        if not ours:
            placed.close()
            return
        try:
            forget_instance(
                self.sessions,
                received.header.sop_instance_uid,
                received.calling_ae,
                "spool fsync failed after the row was committed",
            )
        except Exception as exc:
            # Row and file stay, matching; the file may not be durable. Not answered
            # Success, the sender sends it again.
            placed.close()
            raise DatabaseUnavailable(f"database: {type(exc).__name__}") from None
        placed.discard()

    def _place(self, received: Received, meta: bytes, dataset: memoryview) -> tuple[Placed, str]:
        if len(dataset) < _HASH_ASIDE_BYTES:
            return self.spool.place(received.path, (meta, dataset)), _content_digest(dataset)
        # A large instance is hashed while its file is written (hashlib and the writes
        # release the GIL); the row needs the digest, so the commit waits for it.
        hashing = _HASHER.submit(_content_digest, dataset)
        try:
            placed = self.spool.place(received.path, (meta, dataset))
        finally:
            digest = hashing.result()
        return placed, digest

    def _settled_digest(self, received: Received) -> str | None:
        """The digest recorded for this instance once no store of it is in flight: None if
        the store that named its file failed, or a crash cut it short (an orphan file).

        Raises
        ------
        StorageUnavailable
            A store of it is still in flight after `_CONCURRENT_WAIT` seconds.
        """
        deadline = time.monotonic() + _CONCURRENT_WAIT
        while self.spool.in_flight(received.path):
            if time.monotonic() >= deadline:
                raise StorageUnavailable("another store of this instance is still in progress")
            time.sleep(0.005)
        return known_digest(self.sessions, received.header.sop_instance_uid)

    def _replace(self, received: Received, meta: bytes, dataset: memoryview) -> None:
        """New content for a known instance: the file is durable before it takes the name
        (it replaces one a job may have read) and before the row names its digest."""
        STORED_BYTES.inc(self.spool.write(received.path, (meta, dataset)))
        self._record_replacement(received)

    def _record_replacement(self, received: Received) -> None:
        try:
            replace_instance(self.sessions, received)
        except Exception as exc:
            raise DatabaseUnavailable(f"database: {type(exc).__name__}") from None

    def _keep_aside(self, header: Header, digest: str, meta: bytes, dataset: memoryview) -> str:
        """Write a resend's different content durably beside the spool's instances; its path.

        Under ``keep`` the first content stays the instance's; the other, answered Success,
        was dropped before, with only a row saying that it came (a corrected image lost).
        Kept under ``resends/``, named by its digest, an administrator can look at it and
        send it again under ``replace``.
        """
        relative = f"{RESENDS}/{header.study_uid}/{header.sop_instance_uid}.{digest[:16]}.dcm"
        STORED_BYTES.inc(self.spool.write(relative, (meta, dataset)))
        return relative

    def _audit(self, action: Action, calling: str, object_id: str, **detail: Any) -> None:
        try:
            with self.sessions() as session, session.begin():
                record(
                    session,
                    action,
                    actor=calling,
                    object_type="instance",
                    object_id=object_id,
                    **detail,
                )
        except Exception as exc:  # with the database down, every refused store comes here
            log.error("could not audit %s: %s", action.value, type(exc).__name__)


# Longer than a store's commit can wait for the database (SQLite's busy timeout, 30 s).
_CONCURRENT_WAIT = 40.0
# A name freed by an orphan's removal may be taken again by yet another store of the same
# instance before ours: look again, a few times.
_NAMING_TRIES = 3


def _content_digest(dataset: memoryview) -> str:
    # The file meta is left out: it names the sender, and a resend may come from another.
    return hashlib.sha256(dataset).hexdigest()
