"""A group commit records its instances in one statement per kind, as one at a time would."""

from __future__ import annotations

import pytest
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from dicomai.audit import verify_chain
from dicomai.db.models import AuditEvent, Instance, Study
from dicomai.db.session import make_engine, make_sessionmaker
from dicomai.ingest.header import Header
from dicomai.ingest.recorder import Received, add_instances, record_instance

CT = "1.2.840.10008.5.1.4.1.1.2"
ROOT = "1.2.826.0.1.3680043.8.498.77"


@pytest.fixture
def sessions(database_url: str) -> sessionmaker[Session]:
    return make_sessionmaker(make_engine(database_url))


def received(study: int, number: int, expected: int | None = None) -> Received:
    study_uid = f"{ROOT}.{study}"
    uid = f"{study_uid}.{number}"
    header = Header(study_uid, f"{study_uid}.0", uid, CT, "CT", None, expected)
    return Received(header, "1.2.840.10008.1.2.1", f"{study}/{number}.dcm", 100, "ab" * 32, "CT1")


def test_a_batch_counts_each_study_and_chains_each_row(sessions: sessionmaker[Session]) -> None:
    assert record_instance(sessions, received(1, 1))
    batch = [received(1, 2), received(2, 1, expected=5), received(1, 3), received(2, 2)]
    with sessions() as session, session.begin():
        add_instances(session, batch)

    with sessions() as session:
        counts = dict(session.execute(select(Study.study_uid, Study.instance_count)).all())
        assert counts == {f"{ROOT}.1": 3, f"{ROOT}.2": 2}
        assert (
            session.scalar(select(Study.expected_instances).where(Study.study_uid == f"{ROOT}.2"))
            == 5
        )
        uids = session.scalars(select(Instance.sop_instance_uid).order_by(Instance.id)).all()
        assert uids == [f"{ROOT}.1.1"] + [r.header.sop_instance_uid for r in batch]
        study_of = dict(
            session.execute(select(Instance.sop_instance_uid, Study.study_uid).join(Study)).all()
        )
        assert all(study_of[r.header.sop_instance_uid] == r.header.study_uid for r in batch)
        events = session.scalars(select(AuditEvent).order_by(AuditEvent.id)).all()
        assert verify_chain(events).ok
        stored = [e.object_id for e in events if e.action == "instance.stored"]
        assert stored == uids


def test_a_batch_that_fails_leaves_nothing(sessions: sessionmaker[Session]) -> None:
    assert record_instance(sessions, received(1, 1))
    with pytest.raises(IntegrityError), sessions() as session, session.begin():
        add_instances(session, [received(1, 2), received(1, 1)])  # a resend inside
    with sessions() as session:
        assert session.scalar(select(Study.instance_count)) == 1
        assert session.scalars(select(Instance.sop_instance_uid)).all() == [f"{ROOT}.1.1"]
        assert [e.action for e in session.scalars(select(AuditEvent))] == ["instance.stored"]
