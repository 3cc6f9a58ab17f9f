"""Under ``resend_policy = "replace"``: an instance back to content an earlier job had."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from model_rows import add_model
from pydicom import Dataset
from sqlalchemy import select, update

from dicomai.db.migrate import upgrade
from dicomai.db.models import Job, JobState, Study, utcnow
from dicomai.db.session import make_engine, make_sessionmaker
from dicomai.ingest.header import Header
from dicomai.ingest.recorder import Received, record_instance, replace_instance
from dicomai.jobs.assembler import CompletionPolicy, complete_studies
from dicomai.results.context import ModelIdentity, ResultContext, SourceImage
from dicomai.rollout.canary import sent_by

STUDY, IMAGE, OTHER = "1.2.3", "1.2.3.1", "1.2.3.2"
# Closes a study as soon as no instance is on its way (no sleeping in the test).
AT_ONCE = CompletionPolicy(quiet_seconds=0)


@pytest.fixture
def sessions(tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url)
    engine = make_engine(url)
    add_model(make_sessionmaker(engine), [])
    yield make_sessionmaker(engine)
    engine.dispose()


def _received(sop: str, sha: str) -> Received:
    header = Header(
        study_uid=STUDY,
        series_uid=STUDY + ".1",
        sop_instance_uid=sop,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1",
        modality="DX",
        body_part=None,
    )
    return Received(header, "1.2.840.10008.1.2.1", f"{STUDY}/{sop}.dcm", 10, sha, "MODALITY")


def _complete(sessions) -> list[int]:
    with sessions() as session, session.begin():
        session.execute(update(Study).values(last_received_at=utcnow()))
    return complete_studies(sessions, AT_ONCE)


def _finish(sessions, job_id: int, state: JobState = JobState.DONE) -> None:
    with sessions() as session, session.begin():
        session.execute(update(Job).where(Job.id == job_id).values(state=state))


def _jobs(sessions) -> list[tuple[int, str]]:
    with sessions() as session:
        return [tuple(r) for r in session.execute(select(Job.id, Job.input_digest))]


def _study_with_two_images(sessions) -> int:
    record_instance(sessions, _received(IMAGE, "a"))
    record_instance(sessions, _received(OTHER, "x"))
    (first,) = _complete(sessions)
    return first


def test_content_back_to_an_earlier_jobs_input_gets_a_new_job(sessions) -> None:
    first = _study_with_two_images(sessions)
    _finish(sessions, first)
    replace_instance(sessions, _received(IMAGE, "b"))  # the correction
    (second,) = _complete(sessions)
    _finish(sessions, second)

    replace_instance(sessions, _received(IMAGE, "a"))  # the correction undone
    new = _complete(sessions)

    # The report in force was computed on "b", no longer stored: "a" needs its report again.
    assert len(new) == 1, "no job for the content the study holds now"
    digests = dict(_jobs(sessions))
    assert digests[new[0]] == digests[first] != digests[second]


def test_a_cancelled_job_on_the_content_does_not_stand_for_its_report(sessions) -> None:
    first = _study_with_two_images(sessions)
    _finish(sessions, first, JobState.CANCELLED)  # superseded before it ran
    replace_instance(sessions, _received(IMAGE, "b"))
    (second,) = _complete(sessions)
    _finish(sessions, second)

    replace_instance(sessions, _received(IMAGE, "a"))
    assert len(_complete(sessions)) == 1, "the content never reported on got no job"


def test_content_back_to_the_report_in_force_gets_no_second_job(sessions) -> None:
    first = _study_with_two_images(sessions)
    _finish(sessions, first)
    replace_instance(sessions, _received(IMAGE, "b"))
    (second,) = _complete(sessions)
    # Its study changed before it ran: cancelled, and the report on "a" stays in force.
    _finish(sessions, second, JobState.CANCELLED)

    replace_instance(sessions, _received(IMAGE, "a"))
    assert _complete(sessions) == []


def _context(revision: int) -> ResultContext:
    source = Dataset()
    source.StudyInstanceUID = STUDY
    return ResultContext(
        sources=(SourceImage(source, np.zeros((2, 2), np.uint8)),),
        predictions=(),
        model=ModelIdentity("m", "1.0.0", "tinycnn", "0" * 64),
        input_digest="a" * 64,
        revision=revision,
    )


def test_a_later_report_on_an_earlier_input_gets_new_uids() -> None:
    # Job 1 on "a" wrote revision 1; the job on "a" again writes revision 3 (after "b"'s 2):
    # the same input, a new SR that a PACS keeping the first copy of a UID must not drop.
    first, again = _context(1), _context(3)
    assert first.uid("sr") != again.uid("sr")
    assert first.uid("series", IMAGE) != again.uid("series", IMAGE)
    # A retried run of the same job writes the same objects, not a second SR.
    assert again.uid("sr") == _context(3).uid("sr")
    assert first.tracking_uid(IMAGE, "nodule") == again.tracking_uid(IMAGE, "nodule")


def test_an_older_report_on_content_the_study_went_back_to_is_not_the_one_in_force(
    sessions,
) -> None:
    # `sent_by` took the first reported job whose input matched: after A, B and A again it
    # named the version that reported on the first A, and a newer version's job on A would
    # not have sent its report.
    first = _study_with_two_images(sessions)
    replace_instance(sessions, _received(IMAGE, "b"))
    (second,) = _complete(sessions)
    with sessions() as session, session.begin():
        session.execute(
            update(Job)
            .where(Job.id.in_((first, second)))
            .values(state=JobState.DONE, reported=True)
        )
    replace_instance(sessions, _received(IMAGE, "a"))
    with sessions() as session:
        study = session.scalars(select(Study)).one()
        assert sent_by(session, "m", study) is None
