"""Engines and sessions: SQLite (WAL, synchronous=FULL) or PostgreSQL from one URL."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import InterfaceError, NoSuchModuleError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session, sessionmaker

from dicomai.errors import ConfigError

# The database unreachable, restarting, or cancelling a transaction (deadlock, serialization):
# not a bug to trace, and their messages carry the statement and the server's address.
TRANSIENT_DATABASE_ERRORS = (OperationalError, InterfaceError, PoolTimeout)


def make_engine(url: str, create: bool = True) -> Engine:
    """Create an engine; SQLite gets the pragmas that make a commit durable.

    Parameters
    ----------
    url
        SQLAlchemy URL of a SQLite file or a PostgreSQL database.
    create
        Whether a SQLite file that does not exist is created (only `dicomai db upgrade` and
        the demo do: a mistyped path must not become a new, empty database).

    Raises
    ------
    ConfigError
        An unsupported URL, or (`create` False) a SQLite file that does not exist.
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            path = Path(parsed.database)
            if not create and not path.exists():
                raise ConfigError(
                    f"database {path} does not exist: check [database] url, or run "
                    "`dicomai db upgrade` to create it"
                )
            _create_private(path)
        engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    if parsed.drivername == "postgresql":
        url = parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    try:
        # A server that accepts the connection but never answers (stopped, overloaded)
        # gives an error after this long instead of hanging every command.
        return create_engine(url, pool_pre_ping=True, connect_args={"connect_timeout": 10})
    except (NoSuchModuleError, ImportError):
        # A dialect or driver this installation lacks (mysql://...): dicomai runs on
        # PostgreSQL (psycopg) and SQLite.
        raise ConfigError(
            f"database.url: {parsed.drivername} is not supported; use postgresql:// or sqlite://"
        ) from None


def _create_private(path: Path) -> None:
    """Create the SQLite file readable by the service user only; SQLite gives its -wal and
    -shm files the mode of the database file."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # DESIGN.md rule 1: a committed row must survive power loss before we answer Success.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def transaction(sessions: sessionmaker[Session]) -> Iterator[Session]:
    """A session whose work commits on success and rolls back on any error."""
    with sessions() as session, session.begin():
        yield session
