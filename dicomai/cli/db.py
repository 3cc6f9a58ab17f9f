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
    from dicomai.db.migrate import head_revision, upgrade

    url = obj.settings.database_url
    upgrade(url)
    who = operator()
    with admin_session(obj) as session:
        record(
            session,
            Action.DB_UPGRADED,
            actor=who.user,
            object_type="database",
            object_id=head_revision(url),
            **who.detail(),
        )
    click.echo(f"database at revision {head_revision(url)}")


def register(group: click.Group) -> None:
    group.add_command(db)
