"""Study assembly: a study quiet for N seconds becomes one job per applicable deployed model."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from dicomai.audit import Action, record
from dicomai.db.models import (
    RUNNING_STATES,
    Instance,
    Job,
    JobState,
    ModelVersion,
    Study,
    StudyState,
    utcnow,
)
from dicomai.jobs.applicability import applies

log = logging.getLogger(__name__)

ASSEMBLER = "assembler"


def input_digest(instances: list[Instance]) -> str:
    """A digest of a job's input: changes when an instance is added or its bytes change."""
    digest = hashlib.sha256()
    for instance in sorted(instances, key=lambda i: i.sop_instance_uid):
        digest.update(f"{instance.sop_instance_uid}:{instance.sha256};".encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class CompletionPolicy:
    """When a study is complete: whichever of these rules fires first.

    quiet_seconds
        No new instance for this long.
    on_association_end
        The association that sent its last instance has ended.
    max_wait_seconds
        This long since its first instance, however it keeps trickling.
    Expected counts (Number of Study Related Instances, where the sender gives it) close a
    study as soon as that many instances are stored.
    """

    quiet_seconds: float = 30.0
    on_association_end: bool = False
    max_wait_seconds: float = 3600.0

    def is_complete(self, study: Study, now: datetime) -> bool:
        if study.state != StudyState.RECEIVING:
            return False
        ended = study.association_ended_at
        expected = study.expected_instances or 0
        return (
            study.last_received_at <= now - timedelta(seconds=self.quiet_seconds)
            or (self.on_association_end and ended is not None and ended >= study.last_received_at)
            or 0 < expected <= study.instance_count
            or study.first_received_at <= now - timedelta(seconds=self.max_wait_seconds)
        )


def complete_studies(sessions: sessionmaker[Session], policy: CompletionPolicy) -> list[int]:
    """Close the studies `policy` calls complete and create their jobs; return the new job ids."""
    now = utcnow()
    with sessions() as session:
        receiving = session.scalars(select(Study).where(Study.state == StudyState.RECEIVING))
        study_ids = [study.id for study in receiving if policy.is_complete(study, now)]
    job_ids: list[int] = []
    for study_id in study_ids:
        job_ids.extend(_complete_study(sessions, study_id, policy))
    return job_ids


def seconds_until_quiet(sessions: sessionmaker[Session], policy: CompletionPolicy) -> float | None:
    """Seconds until the next receiving study has been quiet for `policy.quiet_seconds` (0 if
    one already has); None when no study is receiving.

    Lets the assembly loop wake when a study falls quiet instead of at its next tick.
    """
    with sessions() as session:
        last = session.scalar(
            select(func.min(Study.last_received_at)).where(Study.state == StudyState.RECEIVING)
        )
    if last is None:
        return None
    due = last + timedelta(seconds=policy.quiet_seconds)
    return max(0.0, (due - utcnow()).total_seconds())


def complete_quiet_studies(sessions: sessionmaker[Session], quiet_seconds: float) -> list[int]:
    """Close studies quiet for `quiet_seconds` (the quiet rule alone)."""
    return complete_studies(sessions, CompletionPolicy(quiet_seconds=quiet_seconds))


def _complete_study(
    sessions: sessionmaker[Session], study_id: int, policy: CompletionPolicy
) -> list[int]:
    with sessions() as session, session.begin():
        study = session.scalar(select(Study).where(Study.id == study_id).with_for_update())
        # Re-checked under the lock: an instance may have arrived since the query.
        if study is None or not policy.is_complete(study, utcnow()):
            return []
        study.state = StudyState.COMPLETE
        study.completed_at = utcnow()
        jobs = _create_jobs(session, study)
        record(
            session,
            Action.STUDY_COMPLETED,
            actor=ASSEMBLER,
            object_type="study",
            object_id=study.id,
            study_uid=study.study_uid,
            instances=study.instance_count,
            jobs=len(jobs),
        )
        session.flush()
        return [job.id for job in jobs]


def _create_jobs(session: Session, study: Study) -> list[Job]:
    models = session.scalars(
        select(ModelVersion).where(ModelVersion.state.in_(RUNNING_STATES))
    ).all()
    jobs = [create_job(session, study, model) for model in models]
    return [job for job in jobs if job is not None]


def create_job(session: Session, study: Study, model: ModelVersion) -> Job | None:
    """Queue a job of `model` on the study's current instances, with its audit row; None if
    the model takes none of them or its latest job is on them already (`current_job`)."""
    taken = taken_instances(study, model)
    if not taken or current_job(session, study, model) is not None:
        return None
    digest = input_digest(taken)
    job = Job(study_id=study.id, model_version_id=model.id, input_digest=digest)
    session.add(job)
    session.flush()
    record(
        session,
        Action.JOB_CREATED,
        actor=ASSEMBLER,
        object_type="job",
        object_id=job.id,
        study_uid=study.study_uid,
        model=model.label,
    )
    return job


def lock_studies(session: Session, study_ids: Iterable[int]) -> None:
    """Lock these studies' rows as completing one does, in id order.

    For a transaction that will queue jobs on studies the assembler may be completing at the
    same moment. It must come before the transaction's first audit row: the assembler holds
    the study's lock while it waits for the audit chain's, so a transaction that held the
    chain and then waited for the study (inserting a job references it) deadlocked with it
    on PostgreSQL. Waiting here, it sees the assembler's jobs once that commits.
    """
    ids = sorted(set(study_ids))
    if ids:
        session.execute(
            select(Study.id).where(Study.id.in_(ids)).order_by(Study.id).with_for_update()
        ).all()


def cancel_job(session: Session, job: Job, actor: str, reason: str) -> None:
    """Cancel `job` (its version was retired), with its audit row."""
    job.state = JobState.CANCELLED
    job.error = reason
    record(
        session,
        Action.JOB_CANCELLED,
        actor=actor,
        object_type="job",
        object_id=job.id,
        study_uid=job.study.study_uid,
        model=job.model_version.label,
        reason=reason,
    )


def current_job(session: Session, study: Study, model: ModelVersion) -> Job | None:
    """`model`'s job on the study's current instances, if it has one: its latest job that
    was not cancelled, if that one's input is what the study holds now.

    An earlier job on the same input does not count: under ``resend_policy = "replace"`` an
    image may go back to content it had before (A, then a correction B, then A again), and
    the report in force is the one on B, so A needs a job again. A cancelled job never ran
    (superseded before it started, or its version retired): the report in force is its
    predecessor's.
    """
    latest = session.scalar(
        select(Job)
        .where(
            Job.study_id == study.id,
            Job.model_version_id == model.id,
            Job.state != JobState.CANCELLED,
        )
        .order_by(Job.id.desc())
        .limit(1)
    )
    if latest is None or latest.input_digest != input_digest(taken_instances(study, model)):
        return None
    return latest


def taken_instances(study: Study, model: ModelVersion) -> list[Instance]:
    """The study's instances that `model` takes: only a change among them is new input for
    it (a presentation state or a copy of our own SR arriving later gives it no new job)."""
    return [i for i in study.instances if applies(model.manifest, i)]


def ensure_report(
    session: Session, study: Study, model: ModelVersion, actor: str, why: str
) -> bool:
    """See that `model` reports on the study's current instances: queue a job for it, or
    queue its finished job again if that one sent nothing (it ran as a shadow, or silent
    beside a canary). Return whether a job was queued.

    Used when the version that was to report is retired: its results will not be sent.
    """
    if create_job(session, study, model) is not None:
        return True
    job = current_job(session, study, model)
    if job is None or job.state != JobState.DONE or job.reported:
        return False  # it does not apply, is yet to run (and send), or has sent
    previous = job.state
    job.state, job.attempts, job.enqueued_at, job.error = JobState.QUEUED, 0, None, None
    record(
        session,
        Action.JOB_RETRIED,
        actor=actor,
        object_type="job",
        object_id=job.id,
        study_uid=study.study_uid,
        model=model.label,
        previous=previous.value,
        reason=why,
    )
    return True
