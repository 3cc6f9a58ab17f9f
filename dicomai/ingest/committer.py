"""Group commit: the rows of concurrent stores share one transaction and one fsync."""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass, field

from sqlalchemy.orm import Session, sessionmaker

from dicomai.ingest.recorder import Received, add_instance, record_instance

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
            batch = [self._queue.get()]
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
                    for pending in batch:
                        add_instance(session, pending.received)
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
