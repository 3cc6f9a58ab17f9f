"""Which associations send a study, as every listener process sees it (SQLite and PostgreSQL)."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from datetime import timedelta
from types import SimpleNamespace

import pytest
from model_rows import upgraded_sessions
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from dicomai.db.models import Study, Transfer, utcnow
from dicomai.ingest import scp, transfers
from dicomai.ingest.header import Header
from dicomai.ingest.recorder import Received, record_instance

STUDY = "1.2.826.0.1.3680043.8.498.5100"
HOUR = 3600.0


@pytest.fixture(params=["sqlite", "postgresql"])
def sessions(request: pytest.FixtureRequest, tmp_path):
    yield from upgraded_sessions(request, tmp_path)


def receive(sessions, study: str, number: int) -> None:
    header = Header(
        study, f"{study}.1", f"{study}.1.{number}", "1.2.840.10008.5.1.4.1.1.1.1", "DX", None
    )
    record_instance(
        sessions, Received(header, "1.2.840.10008.1.2.1", f"{study}/{number}.dcm", 10, "0", "M")
    )


def ended(sessions, study: str) -> bool:
    with sessions() as session:
        return (
            session.scalar(select(Study.association_ended_at).where(Study.study_uid == study))
            is not None
        )


def test_a_study_sent_on_two_associations_ends_at_the_release_of_the_second(sessions) -> None:
    # The associations may be held by two listener processes: only the database sees both.
    for association in ("fast", "slow"):
        transfers.begin(sessions, association, STUDY)
        receive(sessions, STUDY, len(association))
    assert transfers.end(sessions, "fast", HOUR) == set()
    assert not ended(sessions, STUDY)
    assert transfers.end(sessions, "slow", HOUR) == {STUDY}
    assert ended(sessions, STUDY)


def test_an_aborted_association_ends_nothing_and_no_longer_holds_the_study(sessions) -> None:
    for association in ("aborted", "released"):
        transfers.begin(sessions, association, STUDY)
    receive(sessions, STUDY, 1)
    transfers.forget(sessions, "aborted")
    assert not ended(sessions, STUDY)
    # The failed transfer no longer counts: the other one's release ends the study.
    assert transfers.end(sessions, "released", HOUR) == {STUDY}


def test_a_study_recorded_twice_by_one_association_is_held_once(sessions) -> None:
    transfers.begin(sessions, "a", STUDY)
    transfers.begin(sessions, "a", STUDY)  # an earlier store of its first instance failed
    receive(sessions, STUDY, 1)
    assert transfers.end(sessions, "a", HOUR) == {STUDY}


def release_at_once(sessions, associations: list[str]) -> list[set[str]]:
    """End `associations` in threads that start together; return what each marked ended."""
    start = threading.Barrier(len(associations))
    results: list[set[str]] = []

    def release(association: str) -> None:
        start.wait()
        results.append(transfers.end(sessions, association, HOUR))

    threads = [threading.Thread(target=release, args=(a,)) for a in associations]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return results


def test_two_releases_at_once_end_the_study_they_both_sent(sessions) -> None:
    # Each release deletes its own row, then looks for others: at the same moment, each
    # could see the other's row and neither end the study.
    for attempt in range(10):
        study = f"{STUDY}.{attempt}"
        pair = [f"a{attempt}", f"b{attempt}"]
        for association in pair:
            transfers.begin(sessions, association, study)
        receive(sessions, study, 1)
        results = release_at_once(sessions, pair)
        assert sorted(map(sorted, results)) == [[], [study]], f"attempt {attempt}"
        assert ended(sessions, study)


def test_rows_of_a_listener_process_that_died_are_removed_at_start(sessions) -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    host = socket.gethostname()
    alive = transfers.listener_name()
    rows = {
        "dead": f"{host}:{dead}:1234",
        # PID 1 of a container restarted under the same name: the pid runs, another process.
        "pid taken over": alive.rpartition(":")[0] + ":1",
        "alive": alive,
        "elsewhere": f"another-host.{host}:{dead}:1234",
        "elsewhere, long dead": f"old-container:{dead}:1234",
    }
    with sessions() as session, session.begin():
        for association, listener in rows.items():
            started = utcnow() - timedelta(hours=2 if "long dead" in association else 0)
            session.add(
                Transfer(
                    association=association, listener=listener, study_uid=STUDY, started_at=started
                )
            )
    assert transfers.forget_dead_listeners(sessions, stale_after=HOUR) == 3
    with sessions() as session:
        left = set(session.scalars(select(Transfer.association)))
    assert left == {"alive", "elsewhere"}


def test_a_row_older_than_the_maximum_wait_holds_no_study(sessions) -> None:
    # Its process died where no successor recognises it (a container under a new name); the
    # maximum wait closes its study whatever associations are open.
    with sessions() as session, session.begin():
        session.add(
            Transfer(
                association="forgotten",
                listener="old-container:1:1234",
                study_uid=STUDY,
                started_at=utcnow() - timedelta(hours=2),
            )
        )
    transfers.begin(sessions, "live", STUDY)
    receive(sessions, STUDY, 1)
    assert transfers.end(sessions, "live", HOUR) == {STUDY}


def test_a_release_the_database_missed_leaves_no_rows_behind(
    sessions, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The connection's close leaves a released association to its release handler, which
    # must forget the rows itself when it cannot end the study.
    transfers.begin(sessions, "k1", STUDY)
    receive(sessions, STUDY, 1)
    event = SimpleNamespace(assoc=SimpleNamespace(dicomai_transfer="k1", is_released=True))

    def outage_at_release(*args: object, **kwargs: object) -> set[str]:
        raise OperationalError("UPDATE", {}, Exception("server closed the connection"))

    monkeypatch.setattr(transfers, "end", outage_at_release)
    scp.on_association_end(event, sessions, HOUR)
    scp.on_connection_close(event, sessions)
    with sessions() as session:
        assert session.scalars(select(Transfer)).all() == [], "the rows outlived the association"
    assert not ended(sessions, STUDY)


def test_a_connection_closing_before_the_release_handler_runs_leaves_the_study_to_it(
    sessions,
) -> None:
    # The peer closes the connection once it has the release's answer, and the close handler
    # may run first: it had forgotten the rows, and the study then never ended.
    transfers.begin(sessions, "k1", STUDY)
    receive(sessions, STUDY, 1)
    event = SimpleNamespace(assoc=SimpleNamespace(dicomai_transfer="k1", is_released=False))
    event.assoc.dicomai_releasing = True  # set by the reactor before it answers
    scp.on_connection_close(event, sessions)
    scp.on_association_end(event, sessions, HOUR)
    assert ended(sessions, STUDY)
