"""A sender's Number of Study Related Instances and study completion, on a real database."""

from __future__ import annotations

from datetime import timedelta

import pytest
from model_rows import add_model, upgraded_sessions
from sqlalchemy import select, update

from dicomai.db.models import AuditEvent, Study, utcnow
from dicomai.ingest.header import Header
from dicomai.ingest.recorder import Received, add_instances, record_instance
from dicomai.jobs.assembler import CompletionPolicy, complete_studies

DX_IMAGE = "1.2.840.10008.5.1.4.1.1.1.1"
STUDY = "1.2.9"
# No quiet period or maximum wait in reach: only the count can close a study here.
BY_COUNT = CompletionPolicy(quiet_seconds=3600, max_wait_seconds=3600)


@pytest.fixture(params=["sqlite", "postgresql"])
def sessions(request: pytest.FixtureRequest, tmp_path):
    for upgraded in upgraded_sessions(request, tmp_path):
        add_model(upgraded, [])
        yield upgraded


def received(number: int, expected: int | None) -> Received:
    sop = f"{STUDY}.1.{number}"
    header = Header(STUDY, STUDY + ".1", sop, DX_IMAGE, "DX", None, expected)
    return Received(header, "1.2.840.10008.1.2.1", sop, 1, str(number), "MODALITY")


def closes(sessions) -> int:
    with sessions() as session:
        rows = session.scalars(
            select(AuditEvent.action).where(AuditEvent.action == "study.completed")
        )
        return len(rows.all())


def test_a_stale_count_in_every_header_closes_the_study_once_not_at_every_second_image(
    sessions,
) -> None:
    # Every header of a 6-image study says 2 (a count copied from an earlier query): the
    # study closed at 2 images, as documented, and then again at 4 and at 6, each close a
    # job and an SR superseding the one before.
    jobs_after: dict[int, int] = {}
    for number in range(1, 7):
        record_instance(sessions, received(number, 2))
        jobs_after[number] = len(complete_studies(sessions, BY_COUNT))
    assert jobs_after == {1: 0, 2: 1, 3: 0, 4: 0, 5: 0, 6: 0}, "the stale count closed it again"
    assert closes(sessions) == 1
    with sessions() as session:
        study = session.scalars(select(Study)).one()
        assert (study.state.value, study.instance_count) == ("receiving", 6)
    # The reopened study is left to the quiet period, which closes it once, on all 6.
    with sessions() as session, session.begin():
        session.execute(update(Study).values(last_received_at=utcnow() - timedelta(hours=2)))
    assert len(complete_studies(sessions, BY_COUNT)) == 1
    assert closes(sessions) == 2


def test_a_stale_count_in_a_group_commit_of_a_reopened_study_is_not_taken(sessions) -> None:
    # The listener records several stores in one transaction: a reopened study's batch
    # brings the same stale count.
    for number in (1, 2):
        record_instance(sessions, received(number, 2))
    assert len(complete_studies(sessions, BY_COUNT)) == 1
    for batch in ([3, 4], [5, 6]):
        with sessions() as session, session.begin():
            add_instances(session, [received(n, 2) for n in batch])
        assert complete_studies(sessions, BY_COUNT) == [], f"closed again at {batch[-1]}"


def test_a_count_the_reopened_study_has_not_reached_still_closes_it(sessions) -> None:
    for number in (1, 2):
        record_instance(sessions, received(number, 2))
    assert len(complete_studies(sessions, BY_COUNT)) == 1
    # The sender now gives the count of the whole study: it closes at that count.
    for number in (3, 4):
        record_instance(sessions, received(number, 2 if number == 3 else 5))
        assert complete_studies(sessions, BY_COUNT) == []
    record_instance(sessions, received(5, 2))  # stale again: the count of 5 stays
    assert len(complete_studies(sessions, BY_COUNT)) == 1
