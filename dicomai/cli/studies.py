"""`dicomai studies`: what happened to one study, from first instance to delivered result."""

from __future__ import annotations

import click
from sqlalchemy import select

from dicomai.cli.main import Context
from dicomai.cli.session import admin_session
from dicomai.cli.tables import print_fields, print_table, when
from dicomai.db.models import AuditEvent, Study
from dicomai.errors import NotFound


@click.group()
def studies() -> None:
    """Studies received."""


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
            ["SOP INSTANCE UID", "MODALITY", "BODY PART", "VIEW", "SERIES DESCRIPTION"],
            [
                [
                    i.sop_instance_uid,
                    i.modality or "",
                    i.body_part or "",
                    i.view_position or "",
                    i.series_description or "",
                ]
                for i in sorted(study.instances, key=lambda i: i.id)
            ],
        )
        click.echo("\njobs:")
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
