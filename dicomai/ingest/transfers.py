"""Which associations are sending which study, in SQL so that every listener process sees them.

With `complete_on_association_end`, a study is ended by the release of the last association
sending it: parallel series of a CT, or a PACS forwarding priors beside a modality. Each
listener process knew only its own associations, so with `listener_processes > 1` a study sent
on two of them closed at the first release and got a report on part of it.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from dicomai.db.models import Study, StudyState, Transfer, utcnow

log = logging.getLogger(__name__)


def listener_name() -> str:
    """This process as the rows name it: a successor on the same host removes what it left."""
    return f"{socket.gethostname()}:{os.getpid()}"


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


def end(sessions: sessionmaker[Session], association: str, released: bool) -> set[str]:
    """Forget `association`'s transfers; when it was released, mark as ended the studies no
    other association is still sending, and return them.

    An aborted association (`released` False) is a failed transfer that its sender repeats:
    its studies are left to the quiet period.
    """
    with sessions() as session, session.begin():
        # Deleted first: on SQLite this takes the write lock, so two ends run one after the
        # other; on PostgreSQL the study rows' lock below orders them.
        studies = set(
            session.scalars(
                delete(Transfer)
                .where(Transfer.association == association)
                .returning(Transfer.study_uid)
            )
        )
        if not released or not studies:
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
            session.scalars(select(Transfer.study_uid).where(Transfer.study_uid.in_(studies)))
        )
        ended = studies - sending
        if ended:
            session.execute(
                update(Study)
                .where(Study.study_uid.in_(ended), Study.state == StudyState.RECEIVING)
                .values(association_ended_at=utcnow())
            )
        return ended


def forget_dead_listeners(sessions: sessionmaker[Session]) -> int:
    """Delete the rows of this host's listener processes that no longer run; return how many.

    A process killed mid-transfer never ended its associations: their rows would keep the
    studies they name from ending at another association's release.
    """
    host = socket.gethostname()
    with sessions() as session, session.begin():
        listeners = session.scalars(
            select(Transfer.listener).where(Transfer.listener.startswith(f"{host}:")).distinct()
        ).all()
        dead = [name for name in listeners if not _running(name.rpartition(":")[2])]
        if not dead:
            return 0
        result = session.execute(delete(Transfer).where(Transfer.listener.in_(dead)))
        return int(getattr(result, "rowcount", 0) or 0)


def _running(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:  # another user's process
        return True
    return True
