"""A new instance's row is committed while its file is fsynced; no row outlives a lost file.

The listener answers Success only when the file, its name and the row are all durable. The
row's commit overlaps the file's fsyncs, so a failed fsync deletes the committed row again,
and at start the newest rows whose file a power loss took are deleted (`forget_lost_instances`).
"""

from __future__ import annotations

import errno
import os
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from dicomai.audit import verify_chain
from dicomai.config import load_settings
from dicomai.db.models import AuditEvent, Instance, Study
from dicomai.db.session import make_engine, make_sessionmaker
from dicomai.errors import StorageUnavailable
from dicomai.ingest.header import Header
from dicomai.ingest.limits import Limits
from dicomai.ingest.recorder import Received
from dicomai.ingest.recovery import forget_lost_instances
from dicomai.ingest.spool import Spool
from dicomai.ingest.store import Storer

STUDY = "1.2.826.0.1.3680043.8.498.90"
META = b"\0" * 128 + b"DICM"


@pytest.fixture
def storer(database_url: str, tmp_path: Path) -> Storer:
    settings = load_settings(None, storage={"dir": tmp_path / "var", "min_free_mb": 0})
    sessions = make_sessionmaker(make_engine(database_url))
    return Storer(Spool(settings.spool_dir), sessions, Limits(1 << 20, 1 << 30))


def store(storer: Storer, number: int, size: int = 1000) -> Received:
    uid = f"{STUDY}.{number}"
    header = Header(STUDY, f"{STUDY}.0", uid, "1.2.840.10008.5.1.4.1.1.2", "CT", None)
    path = storer.spool.relative_path(STUDY, uid)
    received = Received(header, "1.2.840.10008.1.2.1", path, len(META) + size, "", "CT1")
    storer._store_new(received, META, memoryview(bytes([number % 256]) * size))
    return received


def rows(storer: Storer) -> list[str]:
    with storer.sessions() as session:
        return list(session.scalars(select(Instance.sop_instance_uid).order_by(Instance.id)))


def audit(storer: Storer) -> list[tuple[str, str | None, dict]]:
    with storer.sessions() as session:
        events = session.scalars(select(AuditEvent).order_by(AuditEvent.id)).all()
        assert verify_chain(events).ok
        return [(e.action, e.object_id, e.detail) for e in events]


def study_count(storer: Storer) -> int:
    with storer.sessions() as session:
        return session.scalars(select(Study.instance_count)).one()


def test_a_stored_instance_has_its_file_and_row_when_the_store_returns(storer: Storer) -> None:
    received = store(storer, 1, size=3000)

    assert storer.spool.path(received.path).read_bytes() == META + bytes([1]) * 3000
    assert rows(storer) == [f"{STUDY}.1"]
    assert [name for name in os.listdir(storer.spool.path(STUDY))] == [f"{STUDY}.1.dcm"]


def test_a_failed_fsync_after_the_commit_deletes_the_row_and_the_file(
    storer: Storer, monkeypatch: pytest.MonkeyPatch
) -> None:
    store(storer, 1)
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        # The file is opened under a temporary name that holds the final one.
        if f"{STUDY}.2.dcm" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(StorageUnavailable, match="spool fsync failed: Input/output error"):
        store(storer, 2)

    assert rows(storer) == [f"{STUDY}.1"]
    assert not storer.spool.path(f"{STUDY}/{STUDY}.2.dcm").exists()
    assert study_count(storer) == 1
    events = audit(storer)
    assert [(action, uid) for action, uid, _ in events[-2:]] == [
        ("instance.stored", f"{STUDY}.2"),
        ("instance.discarded", f"{STUDY}.2"),
    ]
    assert events[-1][2] == {"reason": "spool fsync failed after the row was committed"}


def test_at_start_the_newest_rows_whose_files_were_lost_are_deleted(storer: Storer) -> None:
    for number in range(1, 6):
        store(storer, number)
    # Number 1 was received long before the others: its file is outside the crash's reach.
    with storer.sessions() as session, session.begin():
        first = session.scalars(
            select(Instance).where(Instance.sop_instance_uid == f"{STUDY}.1")
        ).one()
        first.received_at -= timedelta(hours=1)
    storer.spool.path(f"{STUDY}/{STUDY}.1.dcm").unlink()
    storer.spool.path(f"{STUDY}/{STUDY}.4.dcm").unlink()
    with open(storer.spool.path(f"{STUDY}/{STUDY}.5.dcm"), "r+b") as file:
        file.truncate(500)

    assert forget_lost_instances(storer.sessions, storer.spool) == 2

    assert rows(storer) == [f"{STUDY}.{n}" for n in (1, 2, 3)]
    assert study_count(storer) == 3
    discarded = [(uid, detail) for action, uid, detail in audit(storer) if "discarded" in action]
    assert discarded == [
        (f"{STUDY}.5", {"reason": "file cut short after a restart (500 of 1132 bytes)"}),
        (f"{STUDY}.4", {"reason": "file missing after a restart"}),
    ]
    assert forget_lost_instances(storer.sessions, storer.spool) == 0


def test_a_resend_after_recovery_is_stored_again(storer: Storer) -> None:
    store(storer, 1)
    storer.spool.path(f"{STUDY}/{STUDY}.1.dcm").unlink()
    forget_lost_instances(storer.sessions, storer.spool)

    received = store(storer, 1)

    assert storer.spool.path(received.path).is_file()
    assert rows(storer) == [f"{STUDY}.1"]
    assert study_count(storer) == 1


def test_a_file_a_crash_left_without_its_row_is_replaced_by_the_resend(storer: Storer) -> None:
    # kill -9 after the file was named, before its row: the sender never got Success.
    orphan = storer.spool.path(f"{STUDY}/{STUDY}.3.dcm")
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(META + b"half of an earlier attempt")

    received = store(storer, 3, size=2000)

    assert storer.spool.path(received.path).read_bytes() == META + bytes([3]) * 2000
    assert rows(storer) == [f"{STUDY}.3"]


def test_a_second_store_waits_for_the_first_to_be_durable_before_taking_its_row(
    storer: Storer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The first store's row is committed while its fsync hangs, then fails: it takes row and
    # file back. A second store of the instance meanwhile must not answer as a resend of it.
    uid = f"{STUDY}.4"
    header = Header(STUDY, f"{STUDY}.0", uid, "1.2.840.10008.5.1.4.1.1.2", "CT", None)
    path = storer.spool.relative_path(STUDY, uid)
    received = Received(header, "1.2.840.10008.1.2.1", path, len(META) + 1000, "", "CT1")
    release = threading.Event()
    real_fsync = os.fsync
    failed: list[int] = []

    def fsync(fd: int) -> None:
        if f"{uid}.dcm" in os.readlink(f"/proc/self/fd/{fd}") and not failed:
            failed.append(fd)
            release.wait(10)  # a slow disk, which then fails
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    first: list[object] = []

    def store_first() -> None:
        try:
            first.append(storer._store_new(received, META, memoryview(b"1" * 1000)))
        except StorageUnavailable as exc:
            first.append(exc)

    thread = threading.Thread(target=store_first)
    thread.start()
    while not rows(storer):  # the first row is committed; its fsync hangs
        time.sleep(0.01)
    threading.Timer(0.3, release.set).start()
    second = storer._store_new(received, META, memoryview(b"2" * 1000))
    thread.join(10)

    assert isinstance(first[0], StorageUnavailable)
    assert second is None, "answered as a resend of a store that then failed"
    assert rows(storer) == [uid]
    assert storer.spool.path(path).read_bytes() == META + b"2" * 1000


def test_a_failed_fsync_whose_row_cannot_be_deleted_leaves_no_lock_behind(
    storer: Storer, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if f"{STUDY}.5.dcm" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    def database_gone(*_args: object) -> None:
        raise RuntimeError("database gone")

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr("dicomai.ingest.store.forget_instance", database_gone)
    with pytest.raises(StorageUnavailable, match="database"):
        store(storer, 5)
    # Row and file stay and match; nothing holds the file, so a resend is not kept
    # waiting for a store that ended.
    path = f"{STUDY}/{STUDY}.5.dcm"
    assert not storer.spool.in_flight(path)
    assert rows(storer) == [f"{STUDY}.5"]
    assert storer.spool.path(path).read_bytes() == META + bytes([5]) * 1000


def test_an_orphan_is_removed_only_if_no_row_names_it_when_its_lock_is_held(
    storer: Storer,
) -> None:
    received = store(storer, 6)
    storer.spool.remove_orphan(received.path, has_row=lambda: True)
    assert storer.spool.path(received.path).exists(), "a recorded instance's file was removed"
    storer.spool.remove_orphan(received.path, has_row=lambda: False)
    assert not storer.spool.path(received.path).exists()
