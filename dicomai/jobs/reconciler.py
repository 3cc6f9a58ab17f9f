"""Keeping the broker in step with SQL: ring for new, stuck and abandoned jobs, due deliveries."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from dicomai.audit import Action, record
from dicomai.config import WorkerSettings
from dicomai.db.clock import database_now
from dicomai.db.models import Delivery, DeliveryState, Job, JobState
from dicomai.jobs.assembler import lock_studies
from dicomai.jobs.doorbell import Doorbell
from dicomai.rollout.canary import report_instead

log = logging.getLogger(__name__)

RECONCILER = "reconciler"


@dataclass(frozen=True)
class Leases:
    """How long a rung job or delivery may wait before it is rung again, and how many runs a
    job gets."""

    queued_seconds: float = 300.0
    heartbeat_seconds: float = 60.0
    delivery_seconds: float = 120.0
    max_attempts: int = 3

    @classmethod
    def from_settings(cls, worker: WorkerSettings) -> Leases:
        """The leases of `[worker]` (heartbeat, queued and delivery lease seconds) and its
        `max_attempts`."""
        return cls(
            queued_seconds=worker.queued_lease_seconds,
            heartbeat_seconds=worker.heartbeat_lease_seconds,
            delivery_seconds=worker.delivery_lease_seconds,
            max_attempts=worker.max_attempts,
        )


def ring_jobs(sessions: sessionmaker[Session], doorbell: Doorbell, leases: Leases) -> int:
    """Ring for jobs never rung, rung long ago, or abandoned by a dead worker; return the count.

    An abandoned job that had its `max_attempts` runs fails instead. Heartbeats are compared on
    the database's clock, on which workers write them (`database_now`): a worker whose
    machine's clock is behind is not taken for dead.
    """
    stale_queue = database_now(-leases.queued_seconds)
    stale_heartbeat = database_now(-leases.heartbeat_seconds)
    with sessions() as session, session.begin():
        jobs = session.scalars(
            select(Job)
            .where(
                or_(
                    (Job.state == JobState.QUEUED)
                    & (or_(Job.enqueued_at.is_(None), Job.enqueued_at <= stale_queue)),
                    (Job.state == JobState.RUNNING) & (Job.heartbeat_at <= stale_heartbeat),
                )
            )
            .with_for_update(skip_locked=True)
        ).all()
        # The studies of the jobs to fail for good, locked before the first audit row (see
        # `lock_studies`): another version may have to report on them (`report_instead`).
        lock_studies(session, [job.study_id for job in jobs if _abandoned(job, leases)])
        rung = [job.id for job in jobs if _requeue(session, job, leases)]
    for job_id in rung:
        doorbell.ring_job(job_id)
    return len(rung)


def _abandoned(job: Job, leases: Leases) -> bool:
    return job.state == JobState.RUNNING and job.attempts >= leases.max_attempts


def _requeue(session: Session, job: Job, leases: Leases) -> bool:
    if _abandoned(job, leases):
        job.state = JobState.FAILED
        job.finished_at = database_now()
        job.error = f"abandoned after {job.attempts} attempts"
        record(
            session,
            Action.JOB_FAILED,
            actor=RECONCILER,
            object_type="job",
            object_id=job.id,
            reason=job.error,
        )
        report_instead(session, job, RECONCILER)
        return False
    action = Action.JOB_ENQUEUED
    reason = "new" if job.enqueued_at is None else "re-enqueued"
    if job.state == JobState.RUNNING:
        reason = "worker heartbeat lost"
    job.state = JobState.QUEUED
    job.enqueued_at = database_now()
    record(session, action, actor=RECONCILER, object_type="job", object_id=job.id, reason=reason)
    return True


def ring_deliveries(sessions: sessionmaker[Session], doorbell: Doorbell, leases: Leases) -> int:
    """Ring for pending deliveries that are due and not rung within a lease.

    The attempt claims the delivery itself (`dispatch.claim_due`), so a ring never hides it:
    a ring lost on the way, or a task whose worker died, is rung again a lease later.
    """
    with sessions() as session, session.begin():
        # Rows an attempt is claiming are skipped, not waited for (PostgreSQL; SQLite locks
        # the whole database instead): the two must not deadlock over their row order.
        due = (
            select(Delivery.id)
            .where(
                Delivery.state == DeliveryState.PENDING,
                Delivery.next_attempt_at <= database_now(),
                or_(
                    Delivery.rung_at.is_(None),
                    Delivery.rung_at <= database_now(-leases.delivery_seconds),
                ),
            )
            .order_by(Delivery.id)
            .with_for_update(skip_locked=True)
        )
        ids = session.scalars(
            update(Delivery)
            .where(Delivery.id.in_(due))
            .values(rung_at=database_now())
            .returning(Delivery.id)
            .execution_options(synchronize_session=False)
        ).all()
    for delivery_id in ids:
        doorbell.ring_delivery(delivery_id)
    return len(ids)
