"""Administration commands: `db`, `models`, `jobs`, `audit`, `train-demo`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import click
from sqlalchemy import select
from sqlalchemy.orm import Session

from dicomai.audit import Action, os_user, record
from dicomai.cli.main import Context


@contextmanager
def admin_session(obj: Context) -> Iterator[Session]:
    from dicomai.db.session import make_engine, make_sessionmaker

    sessions = make_sessionmaker(make_engine(obj.settings.database_url))
    with sessions() as session, session.begin():
        yield session


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
    with admin_session(obj) as session:
        record(
            session,
            Action.DB_UPGRADED,
            actor=os_user(),
            object_type="database",
            object_id=head_revision(url),
        )
    click.echo(f"database at revision {head_revision(url)}")


@click.group()
def models() -> None:
    """Model registry and deployment."""


@models.command("register")
@click.argument("path", type=click.Path(path_type=Path))
@click.pass_obj
def models_register(obj: Context, path: Path) -> None:
    """Check the package at PATH (folder or .tar) and add it to the registry."""
    from dicomai.rollout.registry import register

    with admin_session(obj) as session:
        row = register(session, path, obj.settings.registry_dir, os_user())
        click.echo(f"registered {row.label} ({row.architecture}, sha256 {row.weights_sha256[:12]})")


@models.command("activate")
@click.argument("name")
@click.argument("version")
@click.option("--reason", default="", help="Why; recorded in the audit trail.")
@click.pass_obj
def models_activate(obj: Context, name: str, version: str, reason: str) -> None:
    """Make NAME VERSION the active version for new jobs."""
    from dicomai.rollout.registry import activate

    with admin_session(obj) as session:
        row = activate(session, name, version, os_user(), reason)
        click.echo(f"{row.label} is active")


@models.command("list")
@click.pass_obj
def models_list(obj: Context) -> None:
    """List registered model versions and their states."""
    from dicomai.rollout.registry import list_versions

    with admin_session(obj) as session:
        rows = list_versions(session)
        _table(
            ["NAME", "VERSION", "ARCHITECTURE", "STATE", "REGISTERED"],
            [
                [r.name, r.version, r.architecture, r.state.value, _when(r.registered_at)]
                for r in rows
            ],
        )


@click.group()
def jobs() -> None:
    """Jobs: one per study and model version."""


@jobs.command("list")
@click.option("--state", default=None, help="Only jobs in this state.")
@click.option("--limit", default=50, show_default=True)
@click.pass_obj
def jobs_list(obj: Context, state: str | None, limit: int) -> None:
    """List recent jobs, newest first."""
    from dicomai.db.models import Job, JobState

    with admin_session(obj) as session:
        query = select(Job).order_by(Job.id.desc()).limit(limit)
        if state:
            query = query.where(Job.state == JobState(state))
        rows = session.scalars(query).all()
        _table(
            ["ID", "STATE", "STUDY", "MODEL", "ATTEMPTS", "CREATED", "ERROR"],
            [
                [
                    str(j.id),
                    j.state.value,
                    j.study.study_uid,
                    j.model_version.label,
                    str(j.attempts),
                    _when(j.created_at),
                    j.error or "",
                ]
                for j in rows
            ],
        )


@click.group()
def audit() -> None:
    """The audit trail."""


@audit.command("list")
@click.option("--action", default=None, help="Only this action, e.g. instance.stored.")
@click.option("--study", default=None, help="Only events of this Study Instance UID.")
@click.option("--limit", default=100, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.pass_obj
def audit_list(
    obj: Context, action: str | None, study: str | None, limit: int, as_json: bool
) -> None:
    """List audit events, newest first."""
    from dicomai.db.models import AuditEvent

    with admin_session(obj) as session:
        query = select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit)
        if action:
            query = query.where(AuditEvent.action == action)
        if study:
            query = query.where(AuditEvent.study_uid == study)
        rows = session.scalars(query).all()
        if as_json:
            for e in rows:
                click.echo(
                    json.dumps(
                        {
                            "id": e.id,
                            "at": e.at.isoformat(),
                            "actor": e.actor,
                            "action": e.action,
                            "object_type": e.object_type,
                            "object_id": e.object_id,
                            "study_uid": e.study_uid,
                            "detail": e.detail,
                        }
                    )
                )
            return
        _table(
            ["ID", "AT", "ACTOR", "ACTION", "OBJECT"],
            [
                [str(e.id), _when(e.at), e.actor, e.action, f"{e.object_type}:{e.object_id}"]
                for e in rows
            ],
        )


@click.command()
@click.pass_obj
def health(obj: Context) -> None:
    """Check database, broker, spool space and the DICOM listener; exit 1 if any fails."""
    from dicomai.health import run_checks

    results = run_checks(obj.settings)
    _table(
        ["CHECK", "OK", "DETAIL"], [[c.name, "ok" if c.ok else "FAIL", c.detail] for c in results]
    )
    if not all(c.ok for c in results):
        raise SystemExit(1)


@click.command("train-demo")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--seed", default=0, show_default=True)
def train_demo(out: Path, seed: int) -> None:
    """Train the demo model on synthetic images and write its package to OUT (not for diagnosis)."""
    from dicomai.training.demo import build_demo_package

    manifest = build_demo_package(out, seed=seed)
    click.echo(f"wrote {manifest.name} {manifest.version} to {out}")


def _when(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else ""


def _table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=False)]
    for row in [header, *rows]:
        click.echo("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=False)).rstrip())


def register(group: click.Group) -> None:
    for command in (db, models, jobs, audit, health, train_demo):
        group.add_command(command)
