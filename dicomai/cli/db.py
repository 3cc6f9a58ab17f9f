"""`dicomai db`: the database schema."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from dicomai.audit import Action, record
from dicomai.cli.main import Context
from dicomai.cli.session import admin_session, operator
from dicomai.errors import ConfigError

if TYPE_CHECKING:
    from sqlalchemy import Engine


@click.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
@click.pass_obj
def db_upgrade(obj: Context) -> None:
    """Bring the database up to the newest schema (any older version)."""
    from dicomai.db.migrate import current_revision, head_revision, newer_schema, upgrade
    from dicomai.db.session import make_engine

    url = obj.settings.database_url
    engine = make_engine(url)
    try:
        before = current_revision(engine)
        if before is None:
            _refuse_foreign(engine)
    finally:
        engine.dispose()
    head = head_revision(url)
    newer_schema(before, url)
    if before == head:
        # The systemd unit runs this at every start: a current schema is not an event.
        click.echo(f"database at revision {head} (already current)")
        return
    upgrade(url)
    who = operator()
    with admin_session(obj) as session:
        record(
            session,
            Action.DB_UPGRADED,
            actor=who.user,
            object_type="database",
            object_id=head,
            from_revision=before,
            **who.detail(),
        )
    click.echo(f"database at revision {head}")


def _refuse_foreign(engine: Engine) -> None:
    """Refuse a database with tables but no schema revision: another application's (a
    mistyped URL), which an upgrade would fill with dicomai's tables."""
    from sqlalchemy import inspect

    tables = sorted(inspect(engine).get_table_names())
    if tables:
        shown = ", ".join(tables[:5]) + (", ..." if len(tables) > 5 else "")
        raise ConfigError(
            f"the database holds tables ({shown}) but not dicomai's schema: it is not a "
            "dicomai database; point [database] url at an empty database or a dicomai one"
        )


def register(group: click.Group) -> None:
    group.add_command(db)
