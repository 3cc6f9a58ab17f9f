"""Leases across machines: a live worker keeps its job whatever its clock says, and a run that
lost its job (taken over after its lease) writes nothing over the run that took it."""

from __future__ import annotations

import logging
import sys
import threading
from datetime import timedelta
from pathlib import Path

import pytest
from recording import RecordingDoorbell
from servers import wait_for
from sqlalchemy import func, select, update
from test_job_runner import ingest, make_world, study_with_broken_images

import dicomai.db.models as models
import dicomai.jobs.runner as runner_module
from dicomai.audit import Action
from dicomai.db.models import AuditEvent, Delivery, Job, JobState, OutputObject, Prediction
from dicomai.delivery.dispatch import claim_due
from dicomai.ingest.spool import Spool
from dicomai.jobs.assembler import complete_quiet_studies
from dicomai.jobs.claims import claim_job
from dicomai.jobs.reconciler import Leases, ring_deliveries, ring_jobs
from dicomai.jobs.runner import JobRunner

SKEW = timedelta(minutes=10)


@pytest.fixture
def worker_clock_behind(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every thread but the test's own is a worker machine whose clock is `SKEW` behind:
    the test's thread plays `serve` (the reconciler) and workers whose clock is right."""
    real = models.utcnow
    main = threading.main_thread()

    def utcnow():
        now = real()
        return now if threading.current_thread() is main else now - SKEW

    for module in list(sys.modules.values()):
        if module.__name__.startswith("dicomai") and getattr(module, "utcnow", None) is real:
            monkeypatch.setattr(module, "utcnow", utcnow)


class PausedWorker:
    """A JobRunner running `job_id` in its own thread, held after its forward passes (a long
    job, or a worker cut off from the database) until `resume`."""

    def __init__(self, runner: JobRunner, job_id: int, monkeypatch: pytest.MonkeyPatch) -> None:
        self.classified, self._resume = threading.Event(), threading.Event()
        self.error: BaseException | None = None
        real = runner_module.classify

        def classify(*args, **kwargs):
            result = real(*args, **kwargs)
            if threading.current_thread() is self._thread:
                self.classified.set()
                self._resume.wait(120)
            return result

        monkeypatch.setattr(runner_module, "classify", classify)
        self._thread = threading.Thread(target=self._run, args=(runner, job_id), name="worker-a")
        self._thread.start()
        assert self.classified.wait(180), f"the worker never classified: {self.error!r}"

    def _run(self, runner: JobRunner, job_id: int) -> None:
        try:
            runner.run_job(job_id)
        except BaseException as exc:
            self.error = exc

    def stop(self) -> None:
        self._resume.set()
        self._thread.join(120)

    def resume(self) -> None:
        self.stop()
        assert not self._thread.is_alive(), "the resumed worker did not finish"
        assert self.error is None, f"the worker that lost its job raised {self.error!r}"


@pytest.fixture
def paused(monkeypatch: pytest.MonkeyPatch):
    """Start a `PausedWorker`; one a failed test left paused is let go at the end."""
    started: list[PausedWorker] = []

    def start(runner: JobRunner, job_id: int) -> PausedWorker:
        started.append(PausedWorker(runner, job_id, monkeypatch))
        return started[-1]

    yield start
    for worker in started:
        worker.stop()


def one_job(tmp_path: Path, database_url: str, **worker):
    settings, sessions, _ = make_world(
        tmp_path, database_url, batch_window_seconds=0, decode_threads=0, **worker
    )
    ingest(settings, sessions, study_with_broken_images(tmp_path)[0], tmp_path)
    (job_id,) = complete_quiet_studies(sessions, 0)
    return settings, sessions, job_id


def runners(settings, sessions) -> tuple[JobRunner, JobRunner]:
    """Two workers; they share the model, loaded once, to keep the test short."""
    first, second = (JobRunner(settings, sessions, device="cpu") for _ in range(2))
    second._classifiers = first._classifiers
    return first, second


def heartbeat(sessions, job_id: int):
    with sessions() as session:
        return session.get_one(Job, job_id).heartbeat_at


def audit(sessions, job_id: int, action: Action) -> list[AuditEvent]:
    with sessions() as session:
        return list(
            session.scalars(
                select(AuditEvent)
                .where(AuditEvent.object_type == "job", AuditEvent.object_id == str(job_id))
                .where(AuditEvent.action == action.value)
                .order_by(AuditEvent.id)
            )
        )


def results(settings, sessions, job_id: int) -> dict[str, object]:
    """What the user sees of a job: its row, predictions, outputs (with their files'
    identity) and deliveries."""
    spool = Spool(settings.outputs_dir)
    with sessions() as session:
        job = session.get_one(Job, job_id)
        outputs = session.scalars(select(OutputObject).where(OutputObject.job_id == job_id))
        files = {}
        for output in outputs:
            stat = spool.path(output.path).stat()
            files[output.sop_instance_uid] = (output.id, stat.st_ino, stat.st_mtime_ns)
        return {
            "job": (job.state, job.attempts, job.error, job.finished_at),
            "predictions": sorted(
                session.scalars(select(Prediction.id).where(Prediction.job_id == job_id))
            ),
            "outputs": files,
            "deliveries": sorted(
                tuple(row)
                for row in session.execute(select(Delivery.id, Delivery.state, Delivery.attempts))
            ),
        }


@pytest.mark.usefixtures("worker_clock_behind")
def test_a_worker_whose_clock_is_behind_keeps_its_job_and_runs_it_once(
    tmp_path: Path, database_url: str, paused
) -> None:
    """The reproduction of the scale-out review: the reconciler took every heartbeat of a
    worker whose clock was behind for lost, and the job ran again on another worker."""
    settings, sessions, job_id = one_job(tmp_path, database_url, heartbeat_lease_seconds=20)
    behind, right = runners(settings, sessions)
    worker = paused(behind, job_id)
    claimed_at = heartbeat(sessions, job_id)
    wait_for(lambda: heartbeat(sessions, job_id) != claimed_at, 30, "a heartbeat after the claim")

    rung = ring_jobs(sessions, RecordingDoorbell(), Leases.from_settings(settings.worker))
    right.run_job(job_id)  # the task rung, or a redelivered one, on a worker with the right time
    worker.resume()

    assert rung == 0, "the reconciler took a live worker's job for abandoned"
    state, attempts, error, _ = results(settings, sessions, job_id)["job"]
    assert (state, attempts, error) == (JobState.DONE, 1, None)
    assert len(audit(sessions, job_id, Action.JOB_STARTED)) == 1, "the job ran twice"
    assert len(audit(sessions, job_id, Action.JOB_DONE)) == 1
    sent = sorted((tmp_path / "delivered").iterdir())
    assert len(sent) == 2, sent  # its SR and its overlay, each sent once


def test_a_run_taken_over_records_nothing_over_the_run_that_took_it(
    tmp_path: Path, postgres_url: str, paused
) -> None:
    """A worker cut off from the database for longer than the lease comes back after its job
    was run again elsewhere: it must neither record nor send, nor replace the other run's
    files, predictions or final state."""
    settings, sessions, job_id = one_job(tmp_path, postgres_url, heartbeat_lease_seconds=600)
    lost, other = runners(settings, sessions)
    worker = paused(lost, job_id)
    with sessions() as session, session.begin():  # its beats stopped reaching the database
        session.execute(update(Job).values(heartbeat_at=func.now() - timedelta(hours=1)))
    assert ring_jobs(sessions, RecordingDoorbell(), Leases(heartbeat_seconds=60)) == 1
    other.run_job(job_id)
    after_other = results(settings, sessions, job_id)
    delivered = sorted((tmp_path / "delivered").iterdir())

    worker.resume()

    assert after_other["job"][:3] == (JobState.DONE, 2, None)
    assert results(settings, sessions, job_id) == after_other, "the lost run wrote its results"
    assert sorted((tmp_path / "delivered").iterdir()) == delivered
    assert len(audit(sessions, job_id, Action.JOB_DONE)) == 1, "the lost run finished the job"


def test_a_heartbeat_that_finds_its_job_taken_stops_the_run(
    tmp_path: Path,
    postgres_url: str,
    paused,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Its next beat tells the run that another worker holds the job: the run keeps that
    worker's lease as it is (a dead new owner is detected) and writes nothing."""
    settings, sessions, job_id = one_job(tmp_path, postgres_url, heartbeat_lease_seconds=2)
    runner, _ = runners(settings, sessions)
    worker = paused(runner, job_id)
    long_ago = models.utcnow() - timedelta(hours=1)
    with sessions() as session, session.begin():  # another worker's claim, its beats stopped
        session.execute(update(Job).values(attempts=Job.attempts + 1, heartbeat_at=long_ago))

    with caplog.at_level(logging.WARNING, logger=runner_module.__name__):
        wait_for(
            lambda: f"job {job_id} was taken over" in caplog.text,
            30,
            "the run's heartbeat never noticed that its job was taken over",
        )
    worker.resume()

    with sessions() as session:
        job = session.get_one(Job, job_id)
        assert (job.state, job.attempts, job.heartbeat_at) == (JobState.RUNNING, 2, long_ago)
        assert session.scalars(select(OutputObject)).all() == []
        assert session.scalars(select(Prediction)).all() == []
    assert not (tmp_path / "delivered").exists() or not any((tmp_path / "delivered").iterdir())


def test_a_job_at_its_attempts_cap_is_failed_not_taken_over_and_stays_failed(
    tmp_path: Path, postgres_url: str, paused
) -> None:
    """Its last run's worker is silent past the lease: no one may run it a fourth time, and
    when that run comes back it must not turn the reconciler's `failed` into `done` (a
    canary's study handed to the active version would then get no report at all)."""
    settings, sessions, job_id = one_job(tmp_path, postgres_url, heartbeat_lease_seconds=600)
    with sessions() as session, session.begin():
        session.execute(update(Job).values(attempts=2))  # two runs died before this one
    runner, _ = runners(settings, sessions)
    worker = paused(runner, job_id)
    with sessions() as session, session.begin():
        session.execute(update(Job).values(heartbeat_at=func.now() - timedelta(hours=1)))

    with sessions() as session, session.begin():  # a task redelivered to another worker
        taken = claim_job(session, job_id, 60, settings.worker.max_attempts)
    assert taken is None, "a job that had all its attempts was run a fourth time"
    assert ring_jobs(sessions, RecordingDoorbell(), Leases.from_settings(settings.worker)) == 0
    worker.resume()

    with sessions() as session:
        job = session.get_one(Job, job_id)
        assert (job.state, job.attempts) == (JobState.FAILED, 3)
        assert job.error == "abandoned after 3 attempts"
        assert session.scalars(select(OutputObject)).all() == []
    assert audit(sessions, job_id, Action.JOB_DONE) == []


@pytest.mark.usefixtures("worker_clock_behind")
def test_a_delivery_claimed_on_a_clock_behind_is_not_due_again_for_the_others(
    tmp_path: Path, database_url: str
) -> None:
    settings, sessions, job_id = one_job(tmp_path, database_url)
    JobRunner(settings, sessions, device="cpu").run_job(job_id)
    with sessions() as session, session.begin():
        sr = session.scalars(select(OutputObject).where(OutputObject.kind == "sr")).one()
        due = models.utcnow() - timedelta(hours=1)
        delivery = Delivery(output_id=sr.id, destination="second", next_attempt_at=due)
        session.add(delivery)
        session.flush()
        delivery_id = delivery.id
    lease = settings.worker.delivery_lease_seconds
    claimed: list[int] = []

    def claim_behind() -> None:  # the worker sending it, on a machine whose clock is behind
        with sessions() as session, session.begin():
            claimed.extend(claim_due(session, [delivery_id], lease, "behind"))

    thread = threading.Thread(target=claim_behind)
    thread.start()
    thread.join(60)
    assert claimed == [delivery_id]

    doorbell = RecordingDoorbell()
    ring_deliveries(sessions, doorbell, Leases.from_settings(settings.worker))
    with sessions() as session, session.begin():
        again = claim_due(session, [delivery_id], lease, "other")
    assert doorbell.deliveries == [], "a delivery being sent was rung again"
    assert again == [], "a second worker could claim a delivery being sent"
