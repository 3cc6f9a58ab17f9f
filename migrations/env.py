"""Alembic environment: migrates the database named by dicomai's settings."""

from __future__ import annotations

from alembic import context
from sqlalchemy import event

from dicomai.db.models import Base
from dicomai.errors import ConfigError
from dicomai.db.session import make_engine

config = context.config
target_metadata = Base.metadata


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = make_engine(config.get_main_option("sqlalchemy.url") or "")
    if engine.dialect.name == "sqlite":
        _sqlite_for_migrations(engine)
    with engine.connect() as connection:
        _run(connection)
    engine.dispose()


def _sqlite_for_migrations(engine) -> None:  # type: ignore[no-untyped-def]
    """Foreign keys off and DDL inside the transaction, as batch migrations need on SQLite.

    A batch migration rebuilds a table (copy, drop, rename): with foreign keys enforced,
    dropping one that rows of another reference fails half-way. And Python's sqlite3 commits
    each DDL statement on its own, so a failure left the columns added before it in place
    under the old revision, and every later upgrade failed on them. Alembic's recipe: the
    driver's own transaction handling off, BEGIN issued here.
    """

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
        dbapi_connection.isolation_level = None
        dbapi_connection.execute("PRAGMA foreign_keys=OFF")

    @event.listens_for(engine, "begin")
    def _begin(connection) -> None:  # type: ignore[no-untyped-def]
        connection.exec_driver_sql("BEGIN")


def _check_foreign_keys(connection) -> None:  # type: ignore[no-untyped-def]
    """Fail (and so roll back) if the rebuilt tables broke a reference."""
    broken = connection.exec_driver_sql("PRAGMA foreign_key_check").all()
    if broken:
        tables = sorted({row[0] for row in broken})
        raise ConfigError(
            f"upgrade rolled back: {len(broken)} row(s) of {', '.join(tables)} would reference "
            "rows that do not exist (the database was edited outside dicomai)"
        )


def _render_item(kind: str, obj: object, autogen_context: object) -> str | bool:
    # Our UTCDateTime is DateTime(timezone=True) in DDL; migrations must not import dicomai.
    if kind == "type" and type(obj).__name__ == "UTCDateTime":
        return "sa.DateTime(timezone=True)"
    return False


def _run(connection) -> None:  # type: ignore[no-untyped-def]
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_item=_render_item,
        render_as_batch=connection.dialect.name == "sqlite",
        # With BEGIN issued by `_sqlite_for_migrations`, SQLite rolls DDL back too.
        transactional_ddl=True,
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()
        if connection.dialect.name == "sqlite":
            _check_foreign_keys(connection)


if context.is_offline_mode():
    raise SystemExit("offline migrations are not supported; run `dicomai db upgrade`")
run_migrations_online()
