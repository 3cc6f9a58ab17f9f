"""`dicomai jobs`: list, inspect, retry and cancel jobs (one per study and model version)."""

from __future__ import annotations

import click
from sqlalchemy import select
from sqlalchemy.orm import Session

from dicomai.audit import Action, record
from dicomai.cli.main import Context
from dicomai.cli.params import LIMIT, ROW_ID
from dicomai.cli.session import admin_session, operator
from dicomai.cli.tables import print_fields, print_rows, print_table, when
from dicomai.db.models import Job, JobState, Prediction
from dicomai.errors import InvalidTransition, NotFound

_REASON = click.option("--reason", default="", help="Why; recorded in the audit trail.")
_STATES = click.Choice([s.value for s in JobState])


@click.group()
def jobs() -> None:
    """Jobs: one per study and model version."""


@jobs.command("list")
@click.option("--state", type=_STATES, default=None, help="Only jobs in this state.")
@click.option("--study", default=None, help="Only jobs of this Study Instance UID.")
@click.option("--limit", default=50, show_default=True, type=LIMIT)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.pass_obj
def jobs_list(
    obj: Context, state: str | None, study: str | None, limit: int, as_json: bool
) -> None:
    """List recent jobs, newest first."""
    from dicomai.db.models import Study

    with admin_session(obj) as session:
        query = select(Job).order_by(Job.id.desc()).limit(limit)
        if state:
            query = query.where(Job.state == JobState(state))
        if study:
            query = query.join(Study).where(Study.study_uid == study)
        rows = [_summary(j) for j in session.scalars(query)]
    print_rows(
        ["ID", "STATE", "STUDY", "MODEL", "ATTEMPTS", "CREATED", "ERROR"],
        rows,
        as_json,
    )


@jobs.command("show")
@click.argument("job_id", type=ROW_ID)
@click.pass_obj
def jobs_show(obj: Context, job_id: int) -> None:
    """Show a job: its model version, timings, error, predictions, outputs and deliveries."""
    with admin_session(obj) as session:
        job = _get(session, job_id)
        summary = _summary(job)
        print_fields(
            [
                *summary.items(),
                ("model version id", job.model_version_id),
                ("input digest", job.input_digest),
                ("started", when(job.started_at)),
                ("finished", when(job.finished_at)),
            ]
        )
        predictions = session.scalars(
            select(Prediction).where(Prediction.job_id == job.id).order_by(Prediction.id)
        ).all()
        click.echo("\npredictions:")
        print_table(
            ["IMAGE", "FINDING", "PROBABILITY", "POSITIVE", "EVALUATED", "REASON"],
            [
                [
                    p.instance.sop_instance_uid,
                    p.label or "",
                    "" if p.probability is None else f"{p.probability:.3f}",
                    "" if p.positive is None else ("yes" if p.positive else "no"),
                    "yes" if p.evaluated else "no",
                    p.reason or "",
                ]
                for p in predictions
            ],
        )
        click.echo("\noutputs:")
        print_table(
            ["KIND", "SOP INSTANCE UID", "DELIVERIES"],
            [
                [
                    o.kind,
                    o.sop_instance_uid,
                    " ".join(f"{d.destination}:{d.state.value}" for d in o.deliveries) or "none",
                ]
                for o in job.outputs
            ],
        )


@jobs.command("retry")
@click.argument("job_id", type=ROW_ID)
@_REASON
@click.pass_obj
def jobs_retry(obj: Context, job_id: int, reason: str) -> None:
    """Queue a failed or cancelled job again (the running daemon picks it up)."""
    with admin_session(obj) as session:
        job = _get(session, job_id)
        if job.state not in (JobState.FAILED, JobState.CANCELLED):
            raise InvalidTransition(
                f"job {job_id} is {job.state.value}; only failed or cancelled jobs are retried"
            )
        previous = job.state
        job.state, job.attempts, job.enqueued_at, job.error = JobState.QUEUED, 0, None, None
        _audit(session, job, Action.JOB_RETRIED, previous, reason)
    click.echo(f"job {job_id} queued again")


@jobs.command("cancel")
@click.argument("job_id", type=ROW_ID)
@_REASON
@click.pass_obj
def jobs_cancel(obj: Context, job_id: int, reason: str) -> None:
    """Cancel a queued job; a worker that receives it later skips it."""
    with admin_session(obj) as session:
        job = _get(session, job_id)
        if job.state != JobState.QUEUED:
            raise InvalidTransition(
                f"job {job_id} is {job.state.value}; only queued jobs can be cancelled"
            )
        job.state = JobState.CANCELLED
        _audit(session, job, Action.JOB_CANCELLED, JobState.QUEUED, reason)
    click.echo(f"job {job_id} cancelled")


def _get(session: Session, job_id: int) -> Job:
    job = session.get(Job, job_id)
    if job is None:
        raise NotFound(f"job {job_id} does not exist")
    return job


def _audit(session: Session, job: Job, action: Action, previous: JobState, reason: str) -> None:
    who = operator(reason)
    record(
        session,
        action,
        actor=who.user,
        object_type="job",
        object_id=job.id,
        study_uid=job.study.study_uid,
        previous=previous.value,
        state=job.state.value,
        **who.detail(),
    )


def _summary(job: Job) -> dict[str, object]:
    return {
        "id": job.id,
        "state": job.state.value,
        "study_uid": job.study.study_uid,
        "model": job.model_version.label,
        "attempts": job.attempts,
        "created": when(job.created_at),
        "error": job.error or "",
    }


def register(group: click.Group) -> None:
    group.add_command(jobs)
