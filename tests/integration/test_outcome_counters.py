"""What a worker counts and audits as its jobs and deliveries end: done, retried, failed."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import select, update
from test_job_runner import ingest, make_world, study_with_broken_images

import dicomai.jobs.runner as runner_module
from dicomai.audit import verify_chain
from dicomai.db.models import AuditEvent, Delivery, Job, JobState, utcnow
from dicomai.delivery.dispatch import attempt_deliveries
from dicomai.jobs.assembler import complete_quiet_studies
from dicomai.jobs.runner import JobRunner


def counted(metric: str, label: str, value: str) -> float:
    return REGISTRY.get_sample_value(metric, {label: value}) or 0.0


def jobs(state: str) -> float:
    return counted("dicomai_jobs_total", "state", state)


def deliveries(outcome: str) -> float:
    return counted("dicomai_deliveries_total", "outcome", outcome)


def one_job(tmp_path: Path, **delivery: object):
    """A world (see `make_world`) with `[delivery]` options `delivery`, and one queued job."""
    settings, sessions, _ = make_world(tmp_path)
    settings = settings.model_copy(
        update={"delivery": settings.delivery.model_copy(update=delivery)}
    )
    ingest(settings, sessions, study_with_broken_images(tmp_path)[0], tmp_path)
    (job_id,) = complete_quiet_studies(sessions, 0)
    return settings, sessions, job_id


def job_events(sessions, job_id: int) -> list[tuple[str, str, dict]]:
    with sessions() as session:
        events = session.scalars(select(AuditEvent).order_by(AuditEvent.id)).all()
        assert verify_chain(events).ok
        return [
            (e.action, e.actor, e.detail)
            for e in events
            if e.object_type == "job" and e.object_id == str(job_id)
        ]


def test_a_done_job_and_its_sent_objects_are_counted(tmp_path: Path) -> None:
    settings, sessions, job_id = one_job(tmp_path)
    done, sent = jobs("done"), deliveries("sent")

    JobRunner(settings, sessions, device="cpu").run_job(job_id)

    with sessions() as session:
        assert session.get_one(Job, job_id).state == JobState.DONE
        objects = len(session.scalars(select(Delivery)).all())
    assert objects == 2  # the SR and one overlay
    assert jobs("done") == done + 1
    assert deliveries("sent") == sent + objects


def test_a_failed_attempt_is_audited_and_counted_until_the_job_fails_for_good(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, sessions, job_id = one_job(tmp_path)

    def broken(*args: object) -> None:
        raise RuntimeError("the GPU fell off the bus")

    monkeypatch.setattr(runner_module, "classify", broken)
    runner = JobRunner(settings, sessions, device="cpu")
    retrying, failed = jobs("retrying"), jobs("failed")

    for attempt in (1, 2):
        runner.run_job(job_id)
        with sessions() as session:
            assert session.get_one(Job, job_id).state == JobState.QUEUED
        action, actor, detail = job_events(sessions, job_id)[-1]
        assert (action, actor) == ("job.enqueued", "worker"), "a failed attempt left no audit row"
        assert detail == {"reason": "RuntimeError", "attempt": attempt}
        assert jobs("retrying") == retrying + attempt
    runner.run_job(job_id)

    with sessions() as session:
        assert session.get_one(Job, job_id).state == JobState.FAILED
    action, actor, detail = job_events(sessions, job_id)[-1]
    assert (action, detail["reason"], detail["attempt"]) == ("job.failed", "RuntimeError", 3)
    assert jobs("retrying") == retrying + 2
    assert jobs("failed") == failed + 1


def test_failed_delivery_attempts_are_counted_as_retrying_then_failed(tmp_path: Path) -> None:
    settings, sessions, job_id = one_job(tmp_path, max_attempts=2)
    (tmp_path / "delivered").write_text("a file where the destination folder should be")
    retrying, failed, sent = deliveries("retrying"), deliveries("failed"), deliveries("sent")

    JobRunner(settings, sessions, device="cpu").run_job(job_id)
    assert deliveries("retrying") == retrying + 2  # the SR and one overlay
    with sessions() as session, session.begin():
        ids = list(session.scalars(select(Delivery.id)))
        session.execute(update(Delivery).values(next_attempt_at=utcnow()))  # backoff over
    assert attempt_deliveries(sessions, settings, ids) == 0

    with sessions() as session:
        assert set(session.scalars(select(Delivery.state))) == {"failed"}
    assert deliveries("failed") == failed + 2
    assert deliveries("retrying") == retrying + 2
    assert deliveries("sent") == sent
