"""Recording a received instance and its study in SQL, with its audit row, in one commit."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Table, bindparam, case, func, insert, select, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from dicomai.audit import Action, append, event_row, record
from dicomai.db.models import Instance, Prediction, Study, StudyState, utcnow
from dicomai.ingest.header import Header
from dicomai.ingest.usable import not_applicable


@dataclass(frozen=True)
class Received:
    """A received instance, already durable in the spool."""

    header: Header
    transfer_syntax_uid: str
    path: str
    size: int
    sha256: str
    calling_ae: str


def known_digest(sessions: sessionmaker[Session], sop_instance_uid: str) -> str | None:
    """The content digest of the recorded instance with this UID, or None if there is none."""
    # A Core statement on the table: the ORM's select costs several times as much per store.
    with sessions() as session:
        return session.execute(_KNOWN_DIGEST, {"uid": sop_instance_uid}).scalar()


def recorded_path(sessions: sessionmaker[Session], sop_instance_uid: str) -> str | None:
    """The spool path recorded for the instance with this UID, or None if there is none."""
    with sessions() as session:
        return session.execute(_RECORDED_PATH, {"uid": sop_instance_uid}).scalar()


_INSTANCES = cast(Table, Instance.__table__)
_KNOWN_DIGEST = select(_INSTANCES.c.sha256).where(_INSTANCES.c.sop_instance_uid == bindparam("uid"))
_RECORDED_PATH = select(_INSTANCES.c.path).where(_INSTANCES.c.sop_instance_uid == bindparam("uid"))


def recorded_study(sessions: sessionmaker[Session], sop_instance_uid: str) -> str | None:
    """The Study Instance UID under which the instance with this UID is recorded, if it is."""
    with sessions() as session:
        return session.scalar(
            select(Study.study_uid)
            .join(Instance, Instance.study_id == Study.id)
            .where(Instance.sop_instance_uid == sop_instance_uid)
        )


def is_known(sessions: sessionmaker[Session], sop_instance_uid: str) -> bool:
    """Whether an instance with this SOP Instance UID is already recorded."""
    return known_digest(sessions, sop_instance_uid) is not None


def replace_instance(sessions: sessionmaker[Session], received: Received) -> None:
    """Record new content for a known instance and reopen its study, with an audit row."""
    header = received.header
    with sessions() as session, session.begin():
        instance = session.scalars(
            select(Instance).where(Instance.sop_instance_uid == header.sop_instance_uid)
        ).one()
        previous = instance.sha256
        instance.sha256 = received.sha256
        instance.size = received.size
        instance.transfer_syntax_uid = received.transfer_syntax_uid
        instance.received_at = utcnow()
        now = utcnow()
        reopened = Study.state != StudyState.RECEIVING
        session.execute(
            update(Study)
            .where(Study.id == instance.study_id)
            .values(
                last_received_at=now,
                state=StudyState.RECEIVING,
                # As a late instance does (see `_statements`): a reopened study waits anew.
                first_received_at=case((reopened, now), else_=Study.first_received_at),
                expected_instances=case((reopened, None), else_=Study.expected_instances),
            )
        )
        record(
            session,
            Action.INSTANCE_REPLACED,
            actor=received.calling_ae,
            object_type="instance",
            object_id=header.sop_instance_uid,
            study_uid=header.study_uid,
            previous_sha256=previous,
            sha256=received.sha256,
        )


def forget_instance(
    sessions: sessionmaker[Session], sop_instance_uid: str, actor: str, reason: str
) -> bool:
    """Delete the row of an instance whose file is not safely on disk, with an audit row.

    For an instance recorded while its file was still being made durable (see
    `dicomai.ingest.store`) when that failed, or a power loss cut it short: the sender was
    never answered Success. A row that a job has already used is kept. True if deleted.
    """
    with sessions() as session, session.begin():
        instance = session.scalars(
            select(Instance).where(Instance.sop_instance_uid == sop_instance_uid)
        ).one_or_none()
        if instance is None:
            return False
        used = session.scalar(
            select(func.count())
            .select_from(Prediction)
            .where(Prediction.instance_id == instance.id)
        )
        if used:
            return False
        study = session.get_one(Study, instance.study_id)
        study.instance_count = max(0, study.instance_count - 1)
        session.delete(instance)
        record(
            session,
            Action.INSTANCE_DISCARDED,
            actor=actor,
            object_type="instance",
            object_id=sop_instance_uid,
            study_uid=study.study_uid,
            reason=reason,
        )
    return True


def record_instance(sessions: sessionmaker[Session], received: Received) -> bool:
    """Insert the instance row, upsert its study, audit; commit. Return False for a resend.

    The study is upserted in one statement and the rest are plain inserts: this runs once
    per C-STORE, before Success is answered. A concurrent resend of the same SOP Instance
    UID loses the unique constraint and is treated as a resend (DESIGN.md rule 3).
    """
    try:
        with sessions() as session, session.begin():
            add_instance(session, received)
        return True
    except IntegrityError:
        if is_known(sessions, received.header.sop_instance_uid):
            return False
        raise


def add_instance(session: Session, received: Received) -> None:
    """The statements that record one instance, in the caller's transaction."""
    add_instances(session, [received])


def add_instances(session: Session, batch: Sequence[Received]) -> None:
    """Record several instances (distinct SOP Instance UIDs) in the caller's transaction.

    One upsert per study (its count raised by the study's instances in the batch), one
    insert of every instance row and one of every audit row, where one instance at a time
    took three statements each: a group commit of four stores spent most of its time in
    SQLAlchemy's per-statement work. On the session's connection: through the ORM's execute
    the statements cost twice as much, with nothing mapped to gain from it.
    """
    if not batch:
        return
    now = utcnow()
    connection = session.connection()
    upsert, insert_instance = _statements(connection.dialect.name)
    studies: dict[str, list[Received]] = {}
    for received in batch:
        studies.setdefault(received.header.study_uid, []).append(received)
    # In one order for every writer: two listener processes upserting the same studies in
    # arrival order could each hold the row the other waits for (PostgreSQL).
    study_ids = {
        study_uid: int(connection.execute(upsert, _study_values(members, now)).scalar_one())
        for study_uid, members in sorted(studies.items())
    }
    instances = [_instance_values(study_ids[r.header.study_uid], r, now) for r in batch]
    connection.execute(insert_instance, instances[0] if len(instances) == 1 else instances)
    append(session, [_stored_event(received) for received in batch])


def _study_values(members: Sequence[Received], now: datetime) -> dict[str, Any]:
    first = members[0]
    expected = next(
        (m.header.expected_instances for m in members if m.header.expected_instances), None
    )
    return {
        "study_uid": first.header.study_uid,
        "state": StudyState.RECEIVING,
        "modality": first.header.modality,
        "calling_ae": first.calling_ae,
        "instance_count": len(members),
        "expected_instances": expected,
        "first_received_at": now,
        "last_received_at": now,
    }


def _stored_event(received: Received) -> dict[str, Any]:
    header = received.header
    reason = not_applicable(header.sop_class_uid, header.manufacturer)
    return event_row(
        Action.INSTANCE_STORED,
        actor=received.calling_ae,
        object_type="instance",
        object_id=header.sop_instance_uid,
        study_uid=header.study_uid,
        sop_class_uid=header.sop_class_uid,
        transfer_syntax_uid=received.transfer_syntax_uid,
        size=received.size,
        **({"not_applicable": reason} if reason else {}),
    )


@functools.cache
def _statements(dialect: str) -> tuple[Any, Any]:
    """The study upsert and the instance insert, built once per dialect.

    Built per C-STORE they cost more than running them (SQLAlchemy constructs and keys each
    new statement); prepared with bound parameters they hit the compiled cache every time.
    """
    dialect_insert = postgresql_insert if dialect == "postgresql" else sqlite_insert
    studies = cast(Table, Study.__table__)
    upsert = dialect_insert(studies).values(
        {name: bindparam(name, type_=studies.c[name].type) for name in _STUDY_COLUMNS}
    )
    # A late instance reopens a completed study: its new content gets a new job. Reopened, it
    # waits anew: the maximum wait counts from the late instance (counted from the first one,
    # it had passed, and each late image of a trickle got a job and an SR of its own). The
    # sender's count of the study is taken only while the study has not outgrown it, whether
    # the study is reopened or receiving with no count (after a reopen, or a replaced
    # instance, cleared it): a stale count, in every header, was taken back at the next
    # image of a reopened study and closed it at every second image, a job and an SR each.
    receiving = studies.c.state == StudyState.RECEIVING
    total = studies.c.instance_count + upsert.excluded.instance_count
    expected = studies.c.expected_instances
    statement = upsert.on_conflict_do_update(
        index_elements=[studies.c.study_uid],
        set_={
            "instance_count": total,
            "last_received_at": upsert.excluded.last_received_at,
            "state": upsert.excluded.state,
            "first_received_at": case(
                (receiving, studies.c.first_received_at),
                else_=upsert.excluded.first_received_at,
            ),
            "expected_instances": case(
                (receiving & expected.is_not(None), expected),
                (upsert.excluded.expected_instances >= total, upsert.excluded.expected_instances),
                else_=None,
            ),
        },
    ).returning(studies.c.id)
    return statement, insert(_INSTANCES)


_STUDY_COLUMNS = (
    "study_uid",
    "state",
    "modality",
    "calling_ae",
    "instance_count",
    "expected_instances",
    "first_received_at",
    "last_received_at",
)


def _instance_values(study_id: int, received: Received, now: datetime) -> dict[str, Any]:
    header = received.header
    return dict(
        study_id=study_id,
        sop_instance_uid=header.sop_instance_uid,
        sop_class_uid=header.sop_class_uid,
        series_uid=header.series_uid,
        transfer_syntax_uid=received.transfer_syntax_uid,
        modality=header.modality,
        body_part=header.body_part,
        view_position=header.view_position,
        series_description=header.series_description,
        not_applicable=not_applicable(header.sop_class_uid, header.manufacturer),
        path=received.path,
        size=received.size,
        sha256=received.sha256,
        calling_ae=received.calling_ae,
        received_at=now,
    )
