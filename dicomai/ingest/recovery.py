"""After a crash: the newest instance rows whose files a power loss may have taken."""

from __future__ import annotations

import logging
from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicomai.db.models import Instance
from dicomai.ingest.recorder import forget_instance
from dicomai.ingest.spool import Spool

log = logging.getLogger(__name__)

RECOVERY = "recovery"
# A row is committed while its file's fsyncs run (`dicomai.ingest.store`), so only the stores
# in flight at a power loss can have a row without a durable file: the newest rows, seconds
# apart. A minute before the newest covers them with room for a slow disk.
WINDOW = timedelta(seconds=60)
# Read by id, newest first, so that a start never scans the whole table; far more rows than
# can be in flight at once (associations x group commit).
NEWEST_ROWS = 10_000


def forget_lost_instances(sessions: sessionmaker[Session], spool: Spool) -> int:
    """Delete (with an audit row) the newest rows whose file is missing or shorter than
    recorded; return how many. Call it at start, before any listener runs.

    Their senders were never answered Success, so each will send the instance again or
    report it failed; the row must not make a resend look like a duplicate.
    """
    with sessions() as session:
        newest = session.execute(
            select(Instance.sop_instance_uid, Instance.path, Instance.size, Instance.received_at)
            .order_by(Instance.id.desc())
            .limit(NEWEST_ROWS)
        ).all()
    if not newest:
        return 0
    since = newest[0].received_at - WINDOW
    forgotten = 0
    for uid, path, size, received_at in newest:
        if received_at < since:
            continue
        problem = _problem(spool, path, size)
        if problem and forget_instance(sessions, uid, RECOVERY, problem):
            log.warning("instance row without its file removed: %s", problem)
            forgotten += 1
    return forgotten


def _problem(spool: Spool, path: str, size: int) -> str | None:
    try:
        on_disk = spool.path(path).stat().st_size
    except FileNotFoundError:
        return "file missing after a restart"
    if on_disk < size:
        return f"file cut short after a restart ({on_disk} of {size} bytes)"
    return None
