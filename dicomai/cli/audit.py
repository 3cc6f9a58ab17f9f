"""`dicomai audit`: reading the audit trail and checking that nobody edited it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import click
from sqlalchemy import select

from dicomai.cli.main import Context
from dicomai.cli.params import LIMIT
from dicomai.cli.session import admin_session
from dicomai.cli.tables import print_json, print_table, when
from dicomai.db.models import AuditEvent, utcnow
from dicomai.errors import DicomaiError

_AGE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@click.group()
def audit() -> None:
    """The audit trail."""


@audit.command("list")
@click.option("--since", default=None, help="ISO date/time (UTC) or an age: 30m, 2h, 7d.")
@click.option("--actor", default=None, help="Only events by this user, AE title or component.")
@click.option("--action", default=None, help="Only this action, e.g. model.activated.")
@click.option("--study", default=None, help="Only events of this Study Instance UID.")
@click.option("--limit", default=100, show_default=True, type=LIMIT)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.pass_obj
def audit_list(
    obj: Context,
    since: str | None,
    actor: str | None,
    action: str | None,
    study: str | None,
    limit: int,
    as_json: bool,
) -> None:
    """List audit events, newest first."""
    query = select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit)
    if since:
        query = query.where(AuditEvent.at >= parse_since(since))
    if actor:
        query = query.where(AuditEvent.actor == actor)
    if action:
        query = query.where(AuditEvent.action == action)
    if study:
        query = query.where(AuditEvent.study_uid == study)
    with admin_session(obj) as session:
        rows = session.scalars(query).all()
        if as_json:
            for e in rows:
                print_json(
                    {
                        "id": e.id,
                        "at": e.at.isoformat(),
                        "actor": e.actor,
                        "action": e.action,
                        "object_type": e.object_type,
                        "object_id": e.object_id,
                        "study_uid": e.study_uid,
                        "detail": e.detail,
                        "hash": e.hash,
                    }
                )
            return
        print_table(
            ["ID", "AT", "ACTOR", "ACTION", "OBJECT", "REASON"],
            [
                [
                    e.id,
                    when(e.at),
                    e.actor,
                    e.action,
                    f"{e.object_type}:{e.object_id}",
                    e.detail.get("reason", ""),
                ]
                for e in rows
            ],
        )


@audit.command("verify")
@click.option(
    "--expect-head",
    metavar="HASH",
    help="A head hash printed by an earlier verify: fail unless the chain still holds it.",
)
@click.pass_obj
def audit_verify(obj: Context, expect_head: str | None) -> None:
    """Check the hash chain of the whole trail; name the first row that does not fit.

    Prints the head (newest row's id and hash): keep it outside this database, and pass it
    back with --expect-head to detect rows removed from the end or a rewritten chain.
    """
    from dicomai.audit import verify_chain

    with admin_session(obj) as session:
        events = session.scalars(
            select(AuditEvent).order_by(AuditEvent.id).execution_options(yield_per=1000)
        )
        report = verify_chain(events, expect_head=expect_head)
    if report.broken_id is not None:
        raise DicomaiError(
            f"audit chain broken at row {report.broken_id}: {report.problem} "
            f"({max(report.checked - 1, 0)} rows before it verified)"
        )
    if not report.ok:
        raise DicomaiError(f"audit chain broken: {report.problem}")
    before = f"; {report.unchained} older rows predate the chain" if report.unchained else ""
    click.echo(f"audit chain intact: {report.checked} rows verified{before}")
    if report.head_hash is not None:
        click.echo(f"head: row {report.head_id} {report.head_hash}")


def parse_since(value: str, now: datetime | None = None) -> datetime:
    """An ISO date or time (UTC unless it says otherwise), or an age such as ``2h``."""
    text = value.strip()
    if text[-1:] in _AGE_UNITS and text[:-1].isdigit():
        try:
            return (now or utcnow()) - timedelta(seconds=int(text[:-1]) * _AGE_UNITS[text[-1]])
        except OverflowError:
            raise DicomaiError(f"--since {value!r}: that age reaches before year 1") from None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise DicomaiError(f"--since {value!r}: give an ISO date/time or an age like 2h") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def register(group: click.Group) -> None:
    group.add_command(audit)
