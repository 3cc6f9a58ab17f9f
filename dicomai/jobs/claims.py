"""Claiming jobs for a worker: one atomic transition to RUNNING, alone or with companions."""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, and_, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from dicomai.audit import Action, record
from dicomai.db.clock import database_now
from dicomai.db.models import (
    RUNNING_STATES,
    Job,
    JobState,
    ModelState,
    Study,
    StudyState,
)
from dicomai.jobs.applicability import applies
from dicomai.jobs.assembler import (
    cancel_job,
    ensure_report,
    input_digest,
    lock_studies,
    taken_instances,
)
from dicomai.rollout.deployment import active_version

WORKER = "worker"


@dataclass(frozen=True)
class Claim:
    """What a claimed job needs, read in the claiming transaction.

    `attempt` is the claim's token: the job's attempt count that this claim set. Every later
    write of the run (heartbeat, results, done, failed) applies only while the job is still
    running that attempt; a run whose job was taken over meanwhile writes nothing.
    """

    job_id: int
    study_uid: str
    input_digest: str
    model_version_id: int
    model_path: str
    shadow: bool
    instances: tuple[tuple[str, str], ...]  # (sop_instance_uid, spool path), read in this order
    # The registered weights and manifest: the registry folder must still hold them.
    weights_sha256: str = ""
    manifest: dict[str, Any] | None = None
    attempt: int = 0  # no job runs attempt 0: a claim built without its token writes nothing
    # When the job was queued (its study complete): the report's time on every attempt, so
    # that a retry's overlays show the time of the SR an earlier attempt may have sent.
    created_at: datetime | None = None


def claim_job(
    session: Session, job_id: int, lease_seconds: float, max_attempts: int = 3
) -> Claim | None:
    """Take job `job_id` for this worker, or None if it is finished or another worker has it.

    A running job whose heartbeat is older than `lease_seconds` (on the database's clock,
    which heartbeats are written on) was abandoned by a dead worker (the reconciler's rule)
    and is taken over, unless it had its `max_attempts` runs: the reconciler fails that one.
    One with a fresh heartbeat is being run (possibly in another job's batch), so its
    redelivered task does nothing.
    """
    claimable = or_(
        Job.state == JobState.QUEUED,
        and_(
            Job.state == JobState.RUNNING,
            Job.attempts < max_attempts,
            or_(Job.heartbeat_at.is_(None), Job.heartbeat_at <= database_now(-lease_seconds)),
        ),
    )
    if not _take(session, job_id, claimable):
        return None
    job = session.get_one(Job, job_id, populate_existing=True)
    version = job.model_version
    if version.state not in RUNNING_STATES:
        # Retired (or rolled back) after the job was queued, and not handed over (a retry,
        # a redelivery, a race with the retirement): its results must not reach the PACS;
        # the version active now reports instead.
        lock_studies(session, [job.study_id])
        cancel_job(session, job, WORKER, f"{version.label} is {version.state.value}")
        active = active_version(session, version.name)
        if active is not None:
            why = f"{version.label} retired; {active.label} reports instead"
            ensure_report(session, job.study, active, WORKER, why)
        return None
    if _superseded(job):
        newer = _newer_job(session, job)
        lock_studies(session, [job.study_id])
        cancel_job(session, job, WORKER, f"superseded: its study changed since; {newer}")
        return None
    return _started(session, job, _applicable(job))


def _superseded(job: Job) -> bool:
    """Whether the study changed since `job` was queued and a newer job will report on it.

    The job reads the study's instances when it starts: run, it reported on instances that
    arrived after it was queued, and so did the job they gave the study, and the PACS got
    both reports (a resend after a cut association did it). Where no newer job will come (the
    digest was computed otherwise before an upgrade) it runs on what there is.
    """
    if input_digest(taken_instances(job.study, job.model_version)) == job.input_digest:
        return False
    return job.study.state == StudyState.RECEIVING or any(
        other.id > job.id and other.model_version_id == job.model_version_id
        for other in job.study.jobs
    )


def _newer_job(session: Session, job: Job) -> str:
    newer = session.scalar(
        select(Job.id)
        .where(
            Job.study_id == job.study_id,
            Job.model_version_id == job.model_version_id,
            Job.id > job.id,
        )
        .order_by(Job.id.desc())
        .limit(1)
    )
    return f"job {newer} reports on it" if newer else "its next job reports on it"


def claim_companions(
    session: Session, leader: Claim, studies: Collection[str], room: int
) -> list[Claim]:
    """Take queued jobs of `leader`'s model version, oldest first, whose images fit in `room`.

    Jobs of `studies` are left alone: a later job of a study names the SR of an earlier one
    as its predecessor, which needs that one finished first, as when they run one by one.
    """
    candidates = session.scalars(
        select(Job)
        .join(Study, Job.study_id == Study.id)
        .where(
            Job.state == JobState.QUEUED,
            Job.model_version_id == leader.model_version_id,
            Study.study_uid.not_in(list(studies)),
        )
        .order_by(Job.id)
        .limit(2 * room)
        .with_for_update(skip_locked=True, of=Job)
    ).all()
    claims: list[Claim] = []
    for job in candidates:
        if _superseded(job):
            continue  # left queued: claimed alone, it is cancelled
        instances = _applicable(job)
        if len(instances) > room or job.study.study_uid in studies:
            continue
        if not _take(session, job.id, Job.state == JobState.QUEUED):
            continue  # another worker took it between our read and our update
        session.refresh(job)
        claims.append(_started(session, job, instances))
        studies = {*studies, job.study.study_uid}
        room -= len(instances)
    return claims


def gather_companions(
    sessions: sessionmaker[Session],
    leader: Claim,
    window_seconds: float,
    max_images: int,
    on_claim: Callable[[Claim], None],
) -> list[Claim]:
    """Claim companions for `leader` until `max_images` are gathered or the window closes.

    Each companion is claimed in its own short transaction and handed to `on_claim` at once
    (its heartbeat starts there), then the rest of the window is waited out in small steps.
    """
    deadline = time.monotonic() + window_seconds
    room = max_images - len(leader.instances)
    studies = {leader.study_uid}
    gathered: list[Claim] = []
    while room > 0:
        with sessions() as session, session.begin():
            found = claim_companions(session, leader, studies, room)
        for claim in found:
            on_claim(claim)
            studies.add(claim.study_uid)
            room -= len(claim.instances)
        gathered += found
        left = deadline - time.monotonic()
        if left <= 0:
            break
        time.sleep(min(left, window_seconds / 4))
    return gathered


def _take(session: Session, job_id: int, claimable: ColumnElement[bool]) -> bool:
    """The claim itself: RUNNING, one more attempt, a fresh heartbeat, in one conditional
    UPDATE. The database evaluates the condition under the row's write lock, so of two
    workers racing for a job exactly one sees a row updated."""
    now = database_now()
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, claimable)
        .values(
            state=JobState.RUNNING,
            attempts=Job.attempts + 1,
            started_at=now,
            heartbeat_at=now,
        )
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount == 1)  # type: ignore[attr-defined]


def _applicable(job: Job) -> list[tuple[str, str]]:
    """The (SOP Instance UID, spool path) of the study's instances the job's model takes, in
    UID order: the order they are read and batched in. The results' order is the study's
    viewing order, which only the files hold (`dicomai.jobs.reading.viewing_order`)."""
    manifest = job.model_version.manifest
    instances = sorted(
        (i for i in job.study.instances if applies(manifest, i)), key=lambda i: i.sop_instance_uid
    )
    return [(i.sop_instance_uid, i.path) for i in instances]


def _started(session: Session, job: Job, instances: list[tuple[str, str]]) -> Claim:
    model = job.model_version
    record(
        session,
        Action.JOB_STARTED,
        actor=WORKER,
        object_type="job",
        object_id=job.id,
        study_uid=job.study.study_uid,
        model=model.label,
        attempt=job.attempts,
    )
    return Claim(
        job_id=job.id,
        attempt=job.attempts,
        study_uid=job.study.study_uid,
        input_digest=job.input_digest,
        model_version_id=model.id,
        model_path=model.path,
        shadow=model.state == ModelState.SHADOW,
        instances=tuple(instances),
        weights_sha256=model.weights_sha256,
        manifest=model.manifest,
        created_at=job.created_at,
    )
