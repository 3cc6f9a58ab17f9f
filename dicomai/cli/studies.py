"""`dicomai studies`: what happened to one study, from first instance to delivered result."""

from __future__ import annotations

import click
from sqlalchemy import func, select

from dicomai.cli.main import Context
from dicomai.cli.params import LIMIT
from dicomai.cli.session import admin_session
from dicomai.cli.tables import print_fields, print_rows, print_table, when
from dicomai.db.models import AuditEvent, Job, Study, StudyState
from dicomai.errors import NotFound


@click.group()
def studies() -> None:
    """Studies received."""


@studies.command("list")
@click.option(
    "--state",
    type=click.Choice([state.value for state in StudyState]),
    default=None,
    help="Only studies in this state.",
)
@click.option("--limit", default=50, show_default=True, type=LIMIT)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.pass_obj
def studies_list(obj: Context, state: str | None, limit: int, as_json: bool) -> None:
    """List recent studies, last received first: which are still receiving, and their jobs."""
    jobs = select(func.count()).where(Job.study_id == Study.id).scalar_subquery()
    query = select(Study, jobs).order_by(Study.last_received_at.desc(), Study.id.desc())
    if state:
        query = query.where(Study.state == StudyState(state))
    with admin_session(obj) as session:
        rows = [
            {
                "study_uid": study.study_uid,
                "state": study.state.value,
                "modality": study.modality or "",
                "sender": study.calling_ae or "",
                "instances": study.instance_count,
                "jobs": count,
                "last_received": when(study.last_received_at),
            }
            for study, count in session.execute(query.limit(limit))
        ]
    print_rows(
        ["STUDY", "STATE", "MODALITY", "SENDER", "INSTANCES", "JOBS", "LAST RECEIVED"],
        rows,
        as_json,
    )


@studies.command("show")
@click.argument("study_uid")
@click.pass_obj
def studies_show(obj: Context, study_uid: str) -> None:
    """Show a study: its instances, jobs, outputs, deliveries and audit trail."""
    with admin_session(obj) as session:
        study = session.scalar(select(Study).where(Study.study_uid == study_uid))
        if study is None:
            raise NotFound(f"study {study_uid} has not been received")
        print_fields(
            [
                ("study", study.study_uid),
                ("state", study.state.value),
                ("modality", study.modality),
                ("sender", study.calling_ae),
                ("instances", study.instance_count),
                ("first received", when(study.first_received_at)),
                ("last received", when(study.last_received_at)),
                ("completed", when(study.completed_at)),
            ]
        )
        click.echo("\ninstances:")
        print_table(
            ["SOP INSTANCE UID", "MODALITY", "BODY PART", "VIEW", "SERIES DESCRIPTION", "USE"],
            [
                [
                    i.sop_instance_uid,
                    i.modality or "",
                    i.body_part or "",
                    i.view_position or "",
                    i.series_description or "",
                    f"not applicable: {i.not_applicable}" if i.not_applicable else "",
                ]
                for i in sorted(study.instances, key=lambda i: i.id)
            ],
        )
        click.echo("\njobs:")
        if study.state == StudyState.COMPLETE and not study.jobs:
            # Complete without a job is not a failure: no active model takes its images.
            click.echo(
                "none: no instance is an image a model may use (see USE above)"
                if all(i.not_applicable for i in study.instances)
                else "none: no active, canary or shadow model took its instances when it completed"
            )
        print_table(
            ["ID", "MODEL", "STATE", "ATTEMPTS", "OUTPUTS", "DELIVERIES", "ERROR"],
            [
                [
                    j.id,
                    j.model_version.label,
                    j.state.value,
                    j.attempts,
                    len(j.outputs),
                    " ".join(
                        f"{d.destination}:{d.state.value}" for o in j.outputs for d in o.deliveries
                    )
                    or "none",
                    j.error or "",
                ]
                for j in sorted(study.jobs, key=lambda j: j.id)
            ],
        )
        events = session.scalars(
            select(AuditEvent).where(AuditEvent.study_uid == study_uid).order_by(AuditEvent.id)
        ).all()
        click.echo("\naudit:")
        print_table(
            ["ID", "AT", "ACTOR", "ACTION", "OBJECT"],
            [
                [e.id, when(e.at), e.actor, e.action, f"{e.object_type}:{e.object_id}"]
                for e in events
            ],
        )


def register(group: click.Group) -> None:
    group.add_command(studies)
