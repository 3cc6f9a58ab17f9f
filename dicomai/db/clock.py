"""The database server's clock, on which every lease is written and compared."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Float, literal
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement

from dicomai.db.models import UTCDateTime


def database_now(seconds: float = 0.0) -> ColumnElement[datetime]:
    """The database server's time, `seconds` ahead (behind if negative), as a SQL expression.

    Every lease (a job's claim and heartbeat, a delivery's claim) is written and compared
    on this one clock. Taken from each process's own clock, a worker whose machine ran a
    minute behind had its live job taken for abandoned and run again on another, and a
    delivery claimed there was due again at once for the others.
    """
    return _DatabaseNow(literal(float(seconds), Float()))


class _DatabaseNow(FunctionElement[datetime]):
    type = UTCDateTime()
    inherit_cache = True
    name = "database_now"


@compiles(_DatabaseNow)
def _postgresql_now(element: _DatabaseNow, compiler: SQLCompiler, **kw: Any) -> str:
    # now() is the transaction's start, the same for every row a statement compares.
    return f"(now() + make_interval(secs => {compiler.process(element.clauses, **kw)}))"


@compiles(_DatabaseNow, "sqlite")
def _sqlite_now(element: _DatabaseNow, compiler: SQLCompiler, **kw: Any) -> str:
    # UTC text in the layout SQLAlchemy stores a datetime in, so that the two compare as
    # text. SQLite's clock counts milliseconds: the microseconds added are the
    # millisecond's end, so that a time Python read a moment earlier compares as past.
    seconds = compiler.process(element.clauses, **kw)
    return f"(strftime('%Y-%m-%d %H:%M:%f', julianday('now') + {seconds} / 86400.0) || '999')"
