"""`dicomai db`: the database schema."""

from __future__ import annotations

import click

from dicomai.audit import Action, record
from dicomai.cli.main import Context
from dicomai.cli.session import admin_session, operator


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


def register(group: click.Group) -> None:
    group.add_command(db)
