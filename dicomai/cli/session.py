"""What admin commands share: a database transaction and the operator behind the command."""

from __future__ import annotations

import shlex
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy.orm import Session

from dicomai.audit import Operator, os_user
from dicomai.cli.main import Context


@contextmanager
def admin_session(obj: Context) -> Iterator[Session]:
    """One transaction for the whole command: its change and its audit rows commit together.

    On a schema older or newer than this version's it refuses with what to do: a command's
    query otherwise failed on the first column the schema lacked.
    """
    from dicomai.db.migrate import require_current
    from dicomai.db.session import make_engine, make_sessionmaker

    url = obj.settings.database_url
    engine = make_engine(url, create=False)
    try:
        require_current(engine, url)
        with make_sessionmaker(engine)() as session, session.begin():
            yield session
    finally:
        engine.dispose()


def operator(reason: str = "") -> Operator:
    """The OS user, the command line as typed, and the reason given, for the audit trail."""
    return Operator(os_user(), shlex.join(["dicomai", *sys.argv[1:]]), reason)
