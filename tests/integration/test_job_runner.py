"""A job run in-process: images the model cannot use are reported, outputs are idempotent."""

from __future__ import annotations

import logging
from pathlib import Path

import pydicom
import pytest
from daemon import REPO
from recording import record_dataset
from servers import dciodvfy
from sqlalchemy import select, update

from dicomai.audit import Operator, os_user
from dicomai.config import load_settings
from dicomai.db.migrate import upgrade
from dicomai.db.models import Delivery, Job, JobState, OutputObject, Prediction
from dicomai.db.session import make_engine, make_sessionmaker
from dicomai.ingest.spool import Spool
from dicomai.jobs.assembler import complete_quiet_studies
from dicomai.jobs.runner import JobRunner
from dicomai.rollout.deployment import activate
from dicomai.rollout.registry import register
from dicomai.training.synthetic import write_dicom_images

DX = "1.2.840.10008.5.1.4.1.1.1.1"


@pytest.fixture
def world(tmp_path: Path):
    return make_world(tmp_path)


def make_world(tmp_path: Path, database_url: str = "", **worker):
    """Settings with `[worker]` options `worker`, a migrated database (SQLite unless
    `database_url`) and the demo model active; results go to the folder `delivered`."""
    settings = load_settings(
        None,
        storage={"dir": tmp_path / "var"},
        database={"url": database_url},
        worker=worker,
        destinations=[{"name": "folder", "path": tmp_path / "delivered"}],
    )
    upgrade(settings.database_url)
    sessions = make_sessionmaker(make_engine(settings.database_url))
    with sessions() as session, session.begin():
        operator = Operator(os_user(), "test")
        register(session, REPO / "models" / "demo-chest-nodule", settings.registry_dir, operator)
        activate(session, "demo-chest-nodule", "1.0.0", operator)
    return settings, sessions, tmp_path


def ingest(settings, sessions, ds: pydicom.Dataset, tmp_path: Path) -> None:
    record_dataset(Spool(settings.spool_dir), sessions, ds)


def study_with_broken_images(tmp_path: Path) -> list[pydicom.Dataset]:
    written = write_dicom_images(tmp_path / "synthetic", 6, seed=3, size=256)
    good = next(w for w in written if w.label == 1)
    others = [pydicom.dcmread(w.path) for w in written if w is not good][:2]
    short, huge = others
    short.PixelData = short.PixelData[:100]
    huge.Rows = 60000
    for ds in (short, huge):
        ds.StudyInstanceUID = good.study_uid
    return [pydicom.dcmread(good.path), short, huge]


def sr_texts(item: pydicom.Dataset) -> list[str]:
    """Every text value and code meaning in an SR content tree."""
    found = [str(item.get("TextValue", ""))]
    for code in item.get("ConceptCodeSequence", []):
        found.append(str(code.CodeMeaning))
    for child in item.get("ContentSequence", []):
        found += sr_texts(child)
    return [f for f in found if f]


def test_job_reports_unusable_images_and_reruns_without_duplicates(world) -> None:
    settings, sessions, tmp_path = world
    datasets = study_with_broken_images(tmp_path)
    for ds in datasets:
        ingest(settings, sessions, ds, tmp_path)
    (job_id,) = complete_quiet_studies(sessions, 0)
    runner = JobRunner(settings, sessions, device="cpu")
    runner.run_job(job_id)

    with sessions() as session:
        job = session.get_one(Job, job_id)
        assert job.state == JobState.DONE, job.error
        rows = session.scalars(select(Prediction).where(Prediction.job_id == job_id)).all()
        evaluated = [p for p in rows if p.evaluated]
        skipped = [p for p in rows if not p.evaluated]
        assert len(evaluated) == 1 and evaluated[0].positive, "the nodule image was missed"
        assert len(skipped) == 2 and all(p.reason for p in skipped)
        outputs = session.scalars(select(OutputObject).order_by(OutputObject.id)).all()
        assert sorted(o.kind for o in outputs) == ["sc", "sr"]
        first_uids = [o.sop_instance_uid for o in outputs]
        assert session.scalars(select(Delivery.state)).all() == ["sent", "sent"]

    delivered = sorted((tmp_path / "delivered").iterdir())
    assert len(delivered) == 2
    for path in delivered:
        verdict = dciodvfy(path)
        assert verdict.ok, verdict.output
    sr = next(pydicom.dcmread(p) for p in delivered if pydicom.dcmread(p).Modality == "SR")
    texts = " | ".join(sr_texts(sr)).lower()
    assert "not evaluated" in texts and "pixel" in texts, texts
    assert "explanation=gradcam" in texts, "the SR should name the method of its heat maps"

    with sessions() as session, session.begin():
        session.execute(update(Job).values(state=JobState.QUEUED))
    runner.run_job(job_id)
    with sessions() as session:
        outputs = session.scalars(select(OutputObject).order_by(OutputObject.id)).all()
        assert [o.sop_instance_uid for o in outputs] == first_uids, "a re-run made new objects"
        assert len(session.scalars(select(Delivery)).all()) == 2
        assert len(session.scalars(select(Prediction)).all()) == 3


def test_a_finished_job_is_not_run_twice(world) -> None:
    settings, sessions, tmp_path = world
    ds = study_with_broken_images(tmp_path)[0]
    ingest(settings, sessions, ds, tmp_path)
    (job_id,) = complete_quiet_studies(sessions, 0)
    runner = JobRunner(settings, sessions, device="cpu")
    runner.run_job(job_id)
    runner.run_job(job_id)
    with sessions() as session:
        assert session.get_one(Job, job_id).attempts == 1


def test_the_model_loaded_line_names_the_model_not_its_registry_folder(world, caplog) -> None:
    settings, sessions, _ = world
    with caplog.at_level(logging.INFO, logger="dicomai.jobs.runner"):
        JobRunner(settings, sessions, device="cpu").load_models_in_service()
    loaded = [r.getMessage() for r in caplog.records if " loaded on " in r.getMessage()]
    # With two models the folder's name, the version alone, told the admin neither.
    assert loaded == ["model demo-chest-nodule 1.0.0 loaded on cpu, fp32"]


def test_the_sr_is_sent_before_the_overlays_are_built_and_never_twice(world, monkeypatch) -> None:
    import dicomai.jobs.runner as runner_module

    settings, sessions, tmp_path = world
    ingest(settings, sessions, study_with_broken_images(tmp_path)[0], tmp_path)
    (job_id,) = complete_quiet_studies(sessions, 0)
    delivered = tmp_path / "delivered"
    real = runner_module._write_outputs
    seen: list[list[str]] = []

    def overlays_fail_once(spool, study_uid, datasets):
        if any(kind == "sc" for kind, _ in datasets):
            seen.append(sorted(pydicom.dcmread(p).Modality for p in delivered.iterdir()))
            if len(seen) == 1:
                # A failure after the SR went out (writing the overlays): the job is retried.
                raise RuntimeError("overlay writing broke")
        return real(spool, study_uid, datasets)

    monkeypatch.setattr(runner_module, "_write_outputs", overlays_fail_once)
    runner = JobRunner(settings, sessions, device="cpu")
    runner.run_job(job_id)
    assert seen == [["SR"]], "the SR should reach the destination before any overlay is built"
    with sessions() as session:
        job = session.get_one(Job, job_id)
        assert job.state != JobState.DONE and "RuntimeError" in (job.error or ""), job.error

    with sessions() as session, session.begin():
        session.execute(update(Job).values(state=JobState.QUEUED))
    runner.run_job(job_id)
    with sessions() as session:
        assert session.get_one(Job, job_id).state == JobState.DONE
        rows = session.execute(
            select(OutputObject.kind, Delivery.state, Delivery.attempts).join(Delivery)
        ).all()
    assert sorted(tuple(row) for row in rows) == [("sc", "sent", 1), ("sr", "sent", 1)]
    assert sorted(pydicom.dcmread(p).Modality for p in delivered.iterdir()) == ["OT", "SR"]
