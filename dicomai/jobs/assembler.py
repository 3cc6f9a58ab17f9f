"""Study assembly: a study quiet for N seconds becomes one job per applicable deployed model."""

from __future__ import annotations

import hashlib
import logging
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicomai.audit import Action, record
from dicomai.db.models import Instance, Job, ModelState, ModelVersion, Study, StudyState, utcnow
from dicomai.jobs.applicability import applies

log = logging.getLogger(__name__)

ASSEMBLER = "assembler"
RUNNING_STATES = (ModelState.ACTIVE, ModelState.SHADOW, ModelState.CANARY)


def input_digest(instances: list[Instance]) -> str:
    """A digest of a study's input: changes when an instance is added or its bytes change."""
    digest = hashlib.sha256()
    for instance in sorted(instances, key=lambda i: i.sop_instance_uid):
        digest.update(f"{instance.sop_instance_uid}:{instance.sha256};".encode())
    return digest.hexdigest()


def complete_quiet_studies(sessions: sessionmaker[Session], quiet_seconds: float) -> list[int]:
    """Close studies quiet for `quiet_seconds` and create their jobs; return the new job ids."""
    cutoff = utcnow() - timedelta(seconds=quiet_seconds)
    with sessions() as session:
        study_ids = session.scalars(
            select(Study.id).where(
                Study.state == StudyState.RECEIVING, Study.last_received_at <= cutoff
            )
        ).all()
    job_ids: list[int] = []
    for study_id in study_ids:
        job_ids.extend(_complete_study(sessions, study_id, cutoff))
    return job_ids


def _complete_study(sessions: sessionmaker[Session], study_id: int, cutoff: datetime) -> list[int]:
    with sessions() as session, session.begin():
        study = session.scalar(select(Study).where(Study.id == study_id).with_for_update())
        # Re-checked under the lock: an instance may have arrived since the query.
        if study is None or study.state != StudyState.RECEIVING or study.last_received_at > cutoff:
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
    instances = list(study.instances)
    digest = input_digest(instances)
    models = session.scalars(
        select(ModelVersion).where(ModelVersion.state.in_(RUNNING_STATES))
    ).all()
    jobs = []
    for model in models:
        if not any(applies(model.manifest, instance) for instance in instances):
            continue
        existing = session.scalar(
            select(Job).where(
                Job.study_id == study.id,
                Job.model_version_id == model.id,
                Job.input_digest == digest,
            )
        )
        if existing is not None:
            continue
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
        jobs.append(job)
    return jobs
