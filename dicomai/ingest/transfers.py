"""Which associations are sending which study, in SQL so that every listener process sees them.

With `complete_on_association_end`, a study is ended by the release of the last association
sending it: parallel series of a CT, or a PACS forwarding priors beside a modality. Each
listener process knew only its own associations, so with `listener_processes > 1` a study sent
on two of them closed at the first release and got a report on part of it.

A row outlives its association only when its listener process dies (killed, out of memory):
a listener process starting on the same host removes the rows of processes that no longer run,
and rows older than the maximum wait are not counted anywhere, since that wait closes their
studies whatever associations are open (a container restarted under a new host name leaves
rows no process on it recognises).
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from datetime import timedelta
from pathlib import Path

from sqlalchemy import ColumnElement, delete, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from dicomai.db.models import Study, StudyState, Transfer, utcnow

log = logging.getLogger(__name__)


def listener_name(pid: int | None = None) -> str:
    """A process as the rows name it: host, pid and the pid's start time, so that a process
    given a dead one's pid (PID 1 of a restarted container) is not taken for it."""
    pid = os.getpid() if pid is None else pid
    return f"{socket.gethostname()}:{pid}:{_start_time(pid)}"


def new_association_key() -> str:
    return uuid.uuid4().hex


def begin(sessions: sessionmaker[Session], association: str, study_uid: str) -> None:
    """Record that `association` is sending `study_uid`, before its first instance is stored:
    from then on another association's release does not end the study."""
    try:
        with sessions() as session, session.begin():
            session.add(
                Transfer(association=association, listener=listener_name(), study_uid=study_uid)
            )
    except IntegrityError:  # recorded already: an earlier store of it failed after this
        pass


def end(sessions: sessionmaker[Session], association: str, stale_after: float) -> set[str]:
    """Forget a released `association`'s transfers, mark as ended the studies no other
    association is still sending, and return them. Rows older than `stale_after` seconds (the
    maximum wait) do not hold a study."""
    with sessions() as session, session.begin():
        # Deleted first: on SQLite this takes the write lock, so two ends run one after the
        # other; on PostgreSQL the study rows' lock below orders them.
        studies = _delete(session, association)
        if not studies:
            return set()
        # Two associations released at once: each would see the other's row, not yet deleted,
        # and neither end the study. The second to lock sees the first one's delete.
        session.execute(
            select(Study.id)
            .where(Study.study_uid.in_(studies))
            .order_by(Study.study_uid)
            .with_for_update()
        ).all()
        sending = set(
            session.scalars(
                select(Transfer.study_uid).where(
                    Transfer.study_uid.in_(studies), ~_stale(stale_after)
                )
            )
        )
        ended = studies - sending
        if ended:
            session.execute(
                update(Study)
                .where(Study.study_uid.in_(ended), Study.state == StudyState.RECEIVING)
                .values(association_ended_at=utcnow())
            )
        return ended


def forget(sessions: sessionmaker[Session], association: str) -> None:
    """Forget `association`'s transfers without ending anything: an aborted association is a
    failed transfer that its sender repeats, and its studies are left to the quiet period."""
    with sessions() as session, session.begin():
        _delete(session, association)


def _delete(session: Session, association: str) -> set[str]:
    return set(
        session.scalars(
            delete(Transfer)
            .where(Transfer.association == association)
            .returning(Transfer.study_uid)
        )
    )


def forget_dead_listeners(sessions: sessionmaker[Session], stale_after: float) -> int:
    """Delete the rows of this host's listener processes that no longer run, and rows older
    than `stale_after` seconds of any host; return how many.

    A process killed mid-transfer never ended its associations: their rows would keep the
    studies they name from ending at another association's release.
    """
    host = socket.gethostname()
    with sessions() as session, session.begin():
        listeners = session.scalars(
            select(Transfer.listener).where(Transfer.listener.startswith(f"{host}:")).distinct()
        ).all()
        dead = [name for name in listeners if not _running(name)]
        result = session.execute(
            delete(Transfer).where(or_(Transfer.listener.in_(dead), _stale(stale_after)))
        )
        return int(getattr(result, "rowcount", 0) or 0)


def _stale(stale_after: float) -> ColumnElement[bool]:
    return Transfer.started_at < utcnow() - timedelta(seconds=stale_after)


def _running(name: str) -> bool:
    """Whether the process a row names (`listener_name`) still runs on this host."""
    _, _, rest = name.partition(":")
    pid, _, started = rest.partition(":")
    try:
        return _start_time(int(pid)) == started
    except ValueError:
        return False


def _start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (proc(5), field 22); "" if it runs
    no more (or this system has no /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    # The command name (field 2) may hold spaces and parentheses: count after its last ")".
    return stat.rpartition(")")[2].split()[19]
