"""Group commit: the rows of concurrent stores share one transaction and one fsync."""

from __future__ import annotations

import fcntl
import logging
import os
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from dicomai.ingest.recorder import Received, add_instances, record_instance

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    received: Received
    done: threading.Event = field(default_factory=threading.Event)
    stored: bool = False
    error: BaseException | None = None


class GroupCommitter:
    """Records instances from many handler threads; each caller returns after its commit.

    One writer thread takes whatever stores are waiting (up to `max_batch`) and commits them
    together: with several senders, one durable commit (SQLite `synchronous=FULL`, or a
    PostgreSQL WAL flush) answers many C-STOREs. A batch that fails as a whole (a resend
    racing another process, say) is retried one instance at a time, so one bad row never
    fails its neighbours.
    """

    def __init__(self, sessions: sessionmaker[Session], max_batch: int = 64) -> None:
        self.sessions = sessions
        self.max_batch = max_batch
        self._writers = _WriterLock.for_sessions(sessions)
        self._queue: queue.Queue[_Pending] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="group-commit", daemon=True)
        self._thread.start()

    def record(self, received: Received) -> bool:
        """Record `received` durably; False for a resend of a known instance."""
        pending = _Pending(received)
        self._queue.put(pending)
        pending.done.wait()
        if pending.error is not None:
            raise pending.error
        return pending.stored

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            # Taken before the batch is gathered: stores that arrive while another listener
            # process commits join this batch.
            with self._writers:
                batch = [first]
                while len(batch) < self.max_batch:
                    try:
                        batch.append(self._queue.get_nowait())
                    except queue.Empty:
                        break
                self._commit(batch)

    def _commit(self, batch: list[_Pending]) -> None:
        uids = {p.received.header.sop_instance_uid for p in batch}
        if len(batch) > 1 and len(uids) == len(batch):
            try:
                with self.sessions() as session, session.begin():
                    add_instances(session, [pending.received for pending in batch])
                for pending in batch:
                    pending.stored = True
                    pending.done.set()
                return
            except Exception as exc:
                log.info(
                    "group commit of %d fell back to single commits: %s",
                    len(batch),
                    type(exc).__name__,
                )
        for pending in batch:
            try:
                pending.stored = record_instance(self.sessions, pending.received)
            except BaseException as exc:  # handed to the waiting handler thread
                pending.error = exc
            pending.done.set()


class _WriterLock:
    """An exclusive `flock` that the listener processes sharing one SQLite file take in turn.

    SQLite makes a writer that finds the database locked sleep and retry (1, 2, 5, 10 … ms),
    so two listener processes committing at once lose milliseconds per store. Waiting on a
    `flock` instead wakes the next writer the moment the lock is free, and the stores that
    arrive meanwhile join its batch. PostgreSQL needs none (None: no lock).
    """

    def __init__(self, path: Path | None) -> None:
        self._fd = None if path is None else os.open(path, os.O_RDWR | os.O_CREAT, 0o600)

    @classmethod
    def for_sessions(cls, sessions: sessionmaker[Session]) -> _WriterLock:
        bind = sessions.kw.get("bind")
        url = getattr(bind, "url", None)
        if url is None or url.get_backend_name() != "sqlite":
            return cls(None)
        if not url.database or url.database == ":memory:":
            return cls(None)
        return cls(Path(f"{url.database}.ingest-lock"))

    def __enter__(self) -> None:
        if self._fd is not None:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX)
            except OSError as exc:  # SQLite's own locking still holds; only speed is lost
                log.warning("ingest writer lock unavailable: %s", exc)
                self._fd = None

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
