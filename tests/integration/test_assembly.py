"""Study assembly and the reconciler on a real database (SQLite and PostgreSQL)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from model_rows import add_model, upgraded_sessions
from recording import RecordingDoorbell
from sqlalchemy import select, update

from dicomai.db.models import (
    AuditEvent,
    Instance,
    Job,
    JobState,
    Study,
    utcnow,
)
from dicomai.ingest import transfers
from dicomai.ingest.header import Header
from dicomai.ingest.recorder import Received, record_instance
from dicomai.jobs.assembler import (
    CompletionPolicy,
    complete_quiet_studies,
    complete_studies,
    seconds_until_quiet,
)
from dicomai.jobs.claims import claim_job
from dicomai.jobs.reconciler import Leases, ring_jobs


@pytest.fixture(params=["sqlite", "postgresql"])
def sessions(request: pytest.FixtureRequest, tmp_path):
    yield from upgraded_sessions(request, tmp_path)


DX_IMAGE = "1.2.840.10008.5.1.4.1.1.1.1"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
ENCAPSULATED_PDF = "1.2.840.10008.5.1.4.1.1.104.1"
GRAYSCALE_PRESENTATION_STATE = "1.2.840.10008.5.1.4.1.1.11.1"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def receive(
    sessions,
    study: str,
    sop: str,
    modality: str = "DX",
    sha: str = "0",
    sop_class: str = DX_IMAGE,
    manufacturer: str | None = None,
) -> bool:
    header = Header(
        study_uid=study,
        series_uid=study + ".1",
        sop_instance_uid=sop,
        sop_class_uid=sop_class,
        modality=modality,
        body_part=None,
        manufacturer=manufacturer,
    )
    return record_instance(
        sessions, Received(header, "1.2.840.10008.1.2.1", f"{study}/{sop}.dcm", 10, sha, "MODALITY")
    )


def age_studies(sessions, seconds: float) -> None:
    with sessions() as session, session.begin():
        session.execute(
            update(Study).values(last_received_at=utcnow() - timedelta(seconds=seconds))
        )


def test_quiet_study_gets_one_job_per_applicable_model(sessions) -> None:
    add_model(sessions, ["DX"])
    assert receive(sessions, "1.2.3", "1.2.3.1")
    assert receive(sessions, "1.2.3", "1.2.3.2")
    assert receive(sessions, "1.2.4", "1.2.4.1", modality="CT")
    assert complete_quiet_studies(sessions, 30) == [], "studies completed before their quiet period"

    age_studies(sessions, 60)
    jobs = complete_quiet_studies(sessions, 30)
    assert len(jobs) == 1, "exactly the DX study should get a job"
    assert complete_quiet_studies(sessions, 30) == []
    with sessions() as session:
        states = {
            uid: state for uid, state in session.execute(select(Study.study_uid, Study.state))
        }
        assert {uid: s.value for uid, s in states.items()} == {
            "1.2.3": "complete",
            "1.2.4": "complete",
        }
        actions = session.scalars(select(AuditEvent.action)).all()
        assert actions.count("study.completed") == 2
        assert actions.count("job.created") == 1


def test_the_loop_knows_when_the_next_study_falls_quiet(sessions) -> None:
    policy = CompletionPolicy(quiet_seconds=30.0)
    assert seconds_until_quiet(sessions, policy) is None  # nothing receiving

    receive(sessions, "1.2.3", "1.2.3.1")
    receive(sessions, "1.2.4", "1.2.4.1")
    with sessions() as session, session.begin():
        session.execute(
            update(Study)
            .where(Study.study_uid == "1.2.4")
            .values(last_received_at=utcnow() - timedelta(seconds=20))
        )
    assert 9.0 < (seconds_until_quiet(sessions, policy) or 0.0) <= 10.0  # 1.2.4's, the sooner

    with sessions() as session, session.begin():
        session.execute(
            update(Study)
            .where(Study.study_uid == "1.2.4")
            .values(last_received_at=utcnow() - timedelta(seconds=40))
        )
    assert seconds_until_quiet(sessions, policy) == 0.0
    complete_studies(sessions, policy)
    assert 29.0 < (seconds_until_quiet(sessions, policy) or 0.0) <= 30.0  # 1.2.3's now


def test_resent_instance_is_recorded_once(sessions) -> None:
    assert receive(sessions, "1.2.3", "1.2.3.1")
    assert not receive(sessions, "1.2.3", "1.2.3.1")
    with sessions() as session:
        assert session.scalar(select(Study.instance_count)) == 1


def test_late_instance_gives_a_new_job_for_the_new_input(sessions) -> None:
    add_model(sessions, [])
    receive(sessions, "1.2.3", "1.2.3.1")
    age_studies(sessions, 60)
    first = complete_quiet_studies(sessions, 30)
    receive(sessions, "1.2.3", "1.2.3.2")
    age_studies(sessions, 60)
    second = complete_quiet_studies(sessions, 30)
    assert len(first) == len(second) == 1 and first != second
    with sessions() as session:
        digests = session.scalars(select(Job.input_digest)).all()
        assert len(set(digests)) == 2


def test_reconciler_rings_new_jobs_once_and_abandoned_jobs_again(sessions) -> None:
    add_model(sessions, [])
    receive(sessions, "1.2.3", "1.2.3.1")
    age_studies(sessions, 60)
    (job_id,) = complete_quiet_studies(sessions, 30)
    doorbell = RecordingDoorbell()
    leases = Leases(queued_seconds=300, heartbeat_seconds=60)

    assert ring_jobs(sessions, doorbell, leases) == 1
    assert ring_jobs(sessions, doorbell, leases) == 0, "a rung job was rung again within its lease"

    with sessions() as session, session.begin():
        session.execute(
            update(Job).values(
                state=JobState.RUNNING, attempts=1, heartbeat_at=utcnow() - timedelta(seconds=120)
            )
        )
    assert ring_jobs(sessions, doorbell, leases) == 1
    assert doorbell.jobs == [job_id, job_id]
    with sessions() as session:
        assert session.get_one(Job, job_id).state == JobState.QUEUED


def test_expected_count_completes_a_study_before_its_quiet_period(sessions) -> None:
    add_model(sessions, [])
    header = Header("1.2.9", "1.2.9.1", "1.2.9.1.1", "1.2.840.10008.5.1.4.1.1.1.1", "DX", None, 2)
    record_instance(sessions, Received(header, "1.2.840.10008.1.2.1", "x", 1, "0", "M"))
    policy = CompletionPolicy(quiet_seconds=3600)
    assert complete_studies(sessions, policy) == []
    second = Header("1.2.9", "1.2.9.1", "1.2.9.1.2", header.sop_class_uid, "DX", None, 2)
    record_instance(sessions, Received(second, "1.2.840.10008.1.2.1", "y", 1, "0", "M"))
    assert len(complete_studies(sessions, policy)) == 1


def test_association_end_completes_when_configured(sessions) -> None:
    add_model(sessions, [])
    transfers.begin(sessions, "a", "1.2.3")
    receive(sessions, "1.2.3", "1.2.3.1")
    assert transfers.end(sessions, "a", 3600) == {"1.2.3"}
    assert complete_studies(sessions, CompletionPolicy(quiet_seconds=3600)) == []
    policy = CompletionPolicy(quiet_seconds=3600, on_association_end=True)
    assert len(complete_studies(sessions, policy)) == 1


def test_trickling_study_is_closed_after_the_maximum_wait_and_reopened_waits_anew(
    sessions,
) -> None:
    add_model(sessions, [])
    policy = CompletionPolicy(quiet_seconds=3600, max_wait_seconds=3600)

    def first_received_two_hours_ago() -> None:
        with sessions() as session, session.begin():
            session.execute(update(Study).values(first_received_at=utcnow() - timedelta(hours=2)))

    receive(sessions, "1.2.3", "1.2.3.1")
    first_received_two_hours_ago()
    assert len(complete_studies(sessions, policy)) == 1
    # Counted from the first instance, the maximum wait had passed: each late image of a
    # trickle got a job and an SR of its own.
    receive(sessions, "1.2.3", "1.2.3.2")
    assert complete_studies(sessions, policy) == [], "the late image was closed at once"
    first_received_two_hours_ago()
    assert len(complete_studies(sessions, policy)) == 1


def test_a_senders_count_already_reached_does_not_close_a_reopened_study(sessions) -> None:
    # The count of 2 was reached by the first two; each late image closed the study at once.
    add_model(sessions, [])
    policy = CompletionPolicy(quiet_seconds=3600)
    for sop in ("1.2.9.1.1", "1.2.9.1.2"):
        header = Header("1.2.9", "1.2.9.1", sop, "1.2.840.10008.5.1.4.1.1.1.1", "DX", None, 2)
        record_instance(sessions, Received(header, "1.2.840.10008.1.2.1", sop, 1, "0", "M"))
    assert len(complete_studies(sessions, policy)) == 1
    late = Header("1.2.9", "1.2.9.1", "1.2.9.1.3", "1.2.840.10008.5.1.4.1.1.1.1", "DX", None, 2)
    record_instance(sessions, Received(late, "1.2.840.10008.1.2.1", "z", 1, "0", "M"))
    assert complete_studies(sessions, policy) == [], "a stale count closed the study again"
    # A new count the sender gives for the whole study counts again.
    more = Header("1.2.9", "1.2.9.1", "1.2.9.1.4", "1.2.840.10008.5.1.4.1.1.1.1", "DX", None, 5)
    record_instance(sessions, Received(more, "1.2.840.10008.1.2.1", "w", 1, "0", "M"))
    assert complete_studies(sessions, policy) == []
    fifth = Header("1.2.9", "1.2.9.1", "1.2.9.1.5", "1.2.840.10008.5.1.4.1.1.1.1", "DX", None, 5)
    record_instance(sessions, Received(fifth, "1.2.840.10008.1.2.1", "v", 1, "0", "M"))
    assert len(complete_studies(sessions, policy)) == 1


def test_documents_and_our_own_results_are_stored_but_never_processed(sessions) -> None:
    # A model with no scope took every instance: an SR or a PDF went to the network. And a
    # PACS forwarding every new object back sent our SR and heat maps: each reopened the
    # study and gave it a new job, whose results came back in turn, without end.
    add_model(sessions, [])
    receive(sessions, "1.2.3", "1.2.3.1", modality="SR", sop_class=COMPREHENSIVE_SR)
    receive(sessions, "1.2.3", "1.2.3.2", modality="DOC", sop_class=ENCAPSULATED_PDF)
    age_studies(sessions, 60)
    assert complete_quiet_studies(sessions, 30) == [], "a model was given an SR and a PDF"

    receive(sessions, "1.2.4", "1.2.4.1")
    age_studies(sessions, 60)
    assert len(complete_quiet_studies(sessions, 30)) == 1
    receive(sessions, "1.2.4", "1.2.4.2", modality="PR", sop_class=GRAYSCALE_PRESENTATION_STATE)
    receive(sessions, "1.2.4", "1.2.4.3", "SR", sop_class=COMPREHENSIVE_SR, manufacturer="dicomai")
    receive(sessions, "1.2.4", "1.2.4.4", "OT", sop_class=SECONDARY_CAPTURE, manufacturer="dicomai")
    age_studies(sessions, 60)
    assert complete_quiet_studies(sessions, 30) == [], "late non-images gave the study a new job"

    with sessions() as session:
        marks = {
            uid: mark
            for uid, mark in session.execute(
                select(Instance.sop_instance_uid, Instance.not_applicable)
            )
        }
        stored = session.scalars(
            select(AuditEvent.detail).where(AuditEvent.action == "instance.stored")
        ).all()
    assert marks == {
        "1.2.3.1": "not an image (Comprehensive SR Storage)",
        "1.2.3.2": "not an image (Encapsulated PDF Storage)",
        "1.2.4.1": None,
        "1.2.4.2": "not an image (Grayscale Softcopy Presentation State Storage)",
        "1.2.4.3": "dicomai's own result",
        "1.2.4.4": "dicomai's own result",
    }
    assert sorted(d["not_applicable"] for d in stored if "not_applicable" in d) == sorted(
        m for m in marks.values() if m
    )


def test_a_queued_job_whose_study_changed_is_cancelled_for_the_newer_one(sessions) -> None:
    # A job reads the study's instances when it starts: one queued before a resend reported on
    # the resent images too, and so did the job the resend gave the study: two reports.
    add_model(sessions, [])
    receive(sessions, "1.2.3", "1.2.3.1")
    age_studies(sessions, 60)
    (first,) = complete_quiet_studies(sessions, 30)
    receive(sessions, "1.2.3", "1.2.3.2")  # the study is receiving again

    def claim(job_id: int):
        with sessions() as session, session.begin():
            return claim_job(session, job_id, lease_seconds=60)

    assert claim(first) is None, "the first job ran on the late image too"
    age_studies(sessions, 60)
    (second,) = complete_quiet_studies(sessions, 30)
    claimed = claim(second)
    assert claimed is not None and len(claimed.instances) == 2
    with sessions() as session:
        cancelled = session.get_one(Job, first)
        assert cancelled.state == JobState.CANCELLED, cancelled.state
        assert cancelled.error == "superseded: its study changed since; its next job reports on it"
        assert session.scalar(
            select(AuditEvent.id).where(
                AuditEvent.action == "job.cancelled", AuditEvent.object_id == str(first)
            )
        )


def test_a_queued_job_whose_study_did_not_change_runs(sessions) -> None:
    add_model(sessions, [])
    receive(sessions, "1.2.3", "1.2.3.1")
    receive(sessions, "1.2.4", "1.2.4.1", modality="SR", sop_class=COMPREHENSIVE_SR)
    age_studies(sessions, 60)
    (job_id,) = complete_quiet_studies(sessions, 30)
    receive(sessions, "1.2.3", "1.2.3.2", modality="PR", sop_class=GRAYSCALE_PRESENTATION_STATE)
    with sessions() as session, session.begin():
        claimed = claim_job(session, job_id, lease_seconds=60)
    assert claimed is not None and [uid for uid, _ in claimed.instances] == ["1.2.3.1"]
