"""Which version of a model reports on a study: the canary for the fraction of studies it
selects by study UID, the active version for the rest, and never two of them."""

from __future__ import annotations

import hashlib

from sqlalchemy import select
from sqlalchemy.orm import Session

from dicomai.db.models import Job, JobState, ModelState, ModelVersion, Study
from dicomai.jobs.assembler import current_job, ensure_report, input_digest, taken_instances

# Selection in hundredths of a percent, so that 0.5 % canaries are possible.
_BUCKETS = 10_000

# The smallest share a canary can select: one bucket.
MIN_PERCENT = 100 / _BUCKETS

# A canary's job in these states still gives (or gave) it the study; a failed or cancelled
# one leaves the study to the active version.
_LIVE = (JobState.QUEUED, JobState.RUNNING, JobState.DONE)


def canary_bucket(study_uid: str) -> int:
    """The study's bucket in [0, 10000), the same in every process and on every run."""
    return int(hashlib.sha256(study_uid.encode("ascii")).hexdigest()[:8], 16) % _BUCKETS


def canary_selects(study_uid: str, percent: float) -> bool:
    """Whether a canary at `percent` % sends its results for this study.

    Raising the percentage only adds studies: a study selected at 5 % is selected at 10 %.
    """
    return canary_bucket(study_uid) < round(percent * _BUCKETS / 100)


def reporter(session: Session, name: str, study: Study) -> ModelVersion | None:
    """The version of `name` whose report the study is to get, by the states of now.

    The canary, if it selects the study and has a job on its current instances (a study
    completed before the version became canary stays with the active version, whose job it
    has); otherwise the active version. None if neither exists.
    """
    canary = _in_state(session, name, ModelState.CANARY)
    if canary is not None and canary_selects(study.study_uid, canary.canary_percent or 0.0):
        job = current_job(session, study, canary)
        if job is not None and job.state in _LIVE:
            return canary
    return _in_state(session, name, ModelState.ACTIVE)


def sent_by(session: Session, name: str, study: Study) -> ModelVersion | None:
    """The version of `name` whose report on the study's current instances was made (its
    job `reported`: given to the destinations, where any are configured), if one was.

    Only the latest reported job counts: under ``resend_policy = "replace"`` a study may go
    back to content an older report was on (A, then B, then A), and the report in force is
    then the one on B, not the first one on A. Deliveries were the sign before: with no
    destination configured none is ever made, so every state change queued the reporting
    version's finished jobs again."""
    job = session.scalar(
        select(Job)
        .join(ModelVersion, Job.model_version_id == ModelVersion.id)
        .where(Job.study_id == study.id, ModelVersion.name == name, Job.reported)
        .order_by(Job.id.desc())
        .limit(1)
    )
    # An earlier report, on fewer images or other content, does not answer for the study.
    if job is not None and job.input_digest == input_digest(
        taken_instances(study, job.model_version)
    ):
        return job.model_version
    return None


def sends_results(session: Session, version: ModelVersion, study_uid: str) -> bool:
    """Whether `version`'s results for this study go to the destinations.

    Only the study's reporter (`reporter`) sends, and only if no other version of the model
    has sent its report on the study's current instances: the states may have changed while
    the jobs were queued (a canary's share lowered or raised, a shadow made canary or
    active), and a radiologist gets one report per model and study, not two that may
    disagree, and not none. A shadow never sends, nor does a retired version; a silent
    version's results are stored all the same. The transitions in
    `dicomai.rollout.deployment` queue the reporter again where a version that ran silent
    became the reporter.
    """
    if version.state not in (ModelState.ACTIVE, ModelState.CANARY):
        return False  # a shadow; or a version retired while its job ran
    study = session.scalar(select(Study).where(Study.study_uid == study_uid))
    if study is None:
        return False
    chosen = reporter(session, version.name, study)
    if chosen is None or chosen.id != version.id:
        return False
    other = sent_by(session, version.name, study)
    return other is None or other.id == version.id


def _in_state(session: Session, name: str, state: ModelState) -> ModelVersion | None:
    return session.scalars(
        select(ModelVersion)
        .where(ModelVersion.name == name, ModelVersion.state == state)
        .order_by(ModelVersion.state_changed_at.desc())
    ).first()


def report_instead(session: Session, job: Job, actor: str) -> bool:
    """After `job` failed for good, see that its study still gets a report: the version that
    reports on it now (`reporter`: a failed canary job gives the study back to the active
    version, which ran silent for it) is queued, unless a report went out already.

    The caller locks the study (`dicomai.jobs.assembler.lock_studies`) before its
    transaction's first audit row. Returns whether a job was queued.
    """
    study, name = job.study, job.model_version.name
    if sent_by(session, name, study) is not None:
        return False
    version = reporter(session, name, study)
    if version is None or version.id == job.model_version_id:
        return False
    why = f"{job.model_version.label} failed; {version.label} reports on the study"
    return ensure_report(session, study, version, actor, why)
