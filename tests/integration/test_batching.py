"""Small studies queued together share one forward pass, and each job ends as if run alone."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
import torch
from sqlalchemy import select, update
from test_job_runner import ingest, make_world

from dicomai.audit import Action
from dicomai.db.models import AuditEvent, Delivery, Job, JobState, OutputObject, Prediction, utcnow
from dicomai.ingest.spool import Spool
from dicomai.jobs.assembler import complete_quiet_studies
from dicomai.jobs.runner import JobRunner
from dicomai.models.architectures import TinyCNN
from dicomai.training.synthetic import write_dicom_images


@pytest.fixture
def forwards():
    """The batch size of every forward pass of the demo network (Grad-CAM's included)."""
    sizes: list[int] = []

    def count(module, inputs, _output) -> None:
        if isinstance(module, TinyCNN):
            sizes.append(int(inputs[0].shape[0]))

    handle = torch.nn.modules.module.register_module_forward_hook(count)
    yield sizes
    handle.remove()


def queue_studies(settings, sessions, tmp_path: Path, n: int, seed: int) -> list[pydicom.Dataset]:
    """Ingest `n` one-image studies and let them complete together: one queued job each."""
    datasets = [
        pydicom.dcmread(w.path)
        for w in write_dicom_images(tmp_path / f"studies-{seed}", n, seed=seed, size=128)
    ]
    for ds in datasets:
        ingest(settings, sessions, ds, tmp_path)
    return datasets


def jobs_by_study(sessions) -> dict[str, int]:
    with sessions() as session:
        return {j.study.study_uid: j.id for j in session.scalars(select(Job))}


def referenced_images(sr: pydicom.Dataset) -> set[str]:
    return {str(e.value) for e in sr.iterall() if e.keyword == "ReferencedSOPInstanceUID"}


def outputs_of(settings, sessions, job_id: int) -> dict[str, list[pydicom.Dataset]]:
    spool = Spool(settings.outputs_dir)
    found: dict[str, list[pydicom.Dataset]] = {}
    with sessions() as session:
        for row in session.scalars(select(OutputObject).where(OutputObject.job_id == job_id)):
            found.setdefault(row.kind, []).append(pydicom.dcmread(spool.path(row.path)))
    return found


def warm_runner(settings, sessions, tmp_path: Path) -> JobRunner:
    """A runner that has run one job, so its model is loaded before the batch is measured."""
    runner = JobRunner(settings, sessions, device="cpu")
    queue_studies(settings, sessions, tmp_path, 1, seed=90)
    (job_id,) = complete_quiet_studies(sessions, 0)
    runner.run_job(job_id)
    return runner


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request) -> str:
    """Both backends: the claim is one conditional UPDATE, the candidates SKIP LOCKED."""
    return "" if request.param == "sqlite" else request.getfixturevalue("postgres_url")


def test_three_small_studies_run_in_one_forward_pass_and_finish_alone(
    tmp_path, forwards, database_url
) -> None:
    settings, sessions, _ = make_world(tmp_path, database_url, batch_window_seconds=0.2)
    runner = warm_runner(settings, sessions, tmp_path)
    datasets = queue_studies(settings, sessions, tmp_path, 3, seed=21)
    job_ids = complete_quiet_studies(sessions, 0)
    assert len(job_ids) == 3
    forwards.clear()

    runner.run_job(job_ids[0])
    assert forwards and all(size == 3 for size in forwards), (
        f"forward passes of {forwards} images: the three studies were not batched"
    )
    with sessions() as session:
        jobs = session.scalars(select(Job).where(Job.id.in_(job_ids)).order_by(Job.id)).all()
        assert [(j.state, j.attempts) for j in jobs] == [(JobState.DONE, 1)] * 3
        for job in jobs:
            predictions = session.scalars(select(Prediction).where(Prediction.job_id == job.id))
            assert [p.evaluated for p in predictions] == [True]
        started = session.scalars(
            select(AuditEvent.object_id).where(AuditEvent.action == Action.JOB_STARTED)
        ).all()
        assert sorted(s for s in started if int(s) in job_ids) == sorted(map(str, job_ids)), (
            "each batched job records its own start, once"
        )
        sent = session.scalars(select(Delivery.state)).all()
        assert sent and set(sent) == {"sent"}

    by_study = jobs_by_study(sessions)
    for ds in datasets:
        job_id = by_study[ds.StudyInstanceUID]
        outputs = outputs_of(settings, sessions, job_id)
        (sr,) = outputs["sr"]
        assert sr.StudyInstanceUID == ds.StudyInstanceUID
        assert referenced_images(sr) == {ds.SOPInstanceUID}, f"job {job_id}'s SR"
        (sc,) = outputs["sc"]
        assert sc.StudyInstanceUID == ds.StudyInstanceUID

    # Their own tasks, delivered late, find them done.
    forwards.clear()
    for job_id in job_ids[1:]:
        runner.run_job(job_id)
    assert forwards == []
    with sessions() as session:
        assert [session.get_one(Job, i).attempts for i in job_ids] == [1, 1, 1]


def test_a_broken_study_in_a_batch_leaves_the_others_done(tmp_path) -> None:
    settings, sessions, _ = make_world(tmp_path, batch_window_seconds=0.2)
    good, truncated, missing = queue_studies(settings, sessions, tmp_path, 3, seed=22)
    assert len(complete_quiet_studies(sessions, 0)) == 3
    by_study = jobs_by_study(sessions)
    spool = Spool(settings.spool_dir)
    stored = spool.path(spool.relative_path(truncated.StudyInstanceUID, truncated.SOPInstanceUID))
    broken = pydicom.dcmread(stored)
    broken.PixelData = broken.PixelData[:100]
    broken.save_as(stored, enforce_file_format=True)
    spool.path(spool.relative_path(missing.StudyInstanceUID, missing.SOPInstanceUID)).unlink()

    JobRunner(settings, sessions, device="cpu").run_job(by_study[missing.StudyInstanceUID])

    with sessions() as session:

        def job(ds):
            return session.get_one(Job, by_study[ds.StudyInstanceUID])

        assert job(good).state == JobState.DONE, job(good).error
        (prediction,) = job(good).predictions
        assert prediction.evaluated
        assert job(truncated).state == JobState.DONE, job(truncated).error
        (prediction,) = job(truncated).predictions
        assert not prediction.evaluated and prediction.reason
        # A storage error is no property of the image: the job goes back to the queue.
        assert job(missing).state == JobState.QUEUED and job(missing).error == "FileNotFoundError"
    good_sr = outputs_of(settings, sessions, by_study[good.StudyInstanceUID])["sr"][0]
    assert referenced_images(good_sr) == {good.SOPInstanceUID}
    truncated_sr = outputs_of(settings, sessions, by_study[truncated.StudyInstanceUID])["sr"][0]
    assert referenced_images(truncated_sr) == {truncated.SOPInstanceUID}


def test_a_job_running_in_a_batch_is_not_run_again_by_its_own_task(tmp_path) -> None:
    settings, sessions, _ = make_world(tmp_path)
    queue_studies(settings, sessions, tmp_path, 1, seed=23)
    (job_id,) = complete_quiet_studies(sessions, 0)
    with sessions() as session, session.begin():
        session.execute(
            update(Job)
            .where(Job.id == job_id)
            .values(state=JobState.RUNNING, attempts=1, heartbeat_at=utcnow())
        )
    JobRunner(settings, sessions, device="cpu").run_job(job_id)
    with sessions() as session:
        job = session.get_one(Job, job_id)
        assert (job.state, job.attempts) == (JobState.RUNNING, 1)


def test_a_zero_window_runs_each_job_alone(tmp_path, forwards) -> None:
    settings, sessions, _ = make_world(tmp_path, batch_window_seconds=0)
    queue_studies(settings, sessions, tmp_path, 2, seed=24)
    first, second = complete_quiet_studies(sessions, 0)
    JobRunner(settings, sessions, device="cpu").run_job(first)
    assert forwards and all(size == 1 for size in forwards)
    with sessions() as session:
        assert session.get_one(Job, first).state == JobState.DONE
        assert session.get_one(Job, second).state == JobState.QUEUED
