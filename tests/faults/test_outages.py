"""Outages of what dicomai stands on: the broker, the database, the PACS, the disk."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

import pydicom
import pytest
from faultkit import (
    DEMO,
    PinnedOrthanc,
    RestartablePostgres,
    make_stack,
    one_study,
    store_status,
)
from pydicom.uid import generate_uid
from servers import RedisServer, storescu, wait_for

OUT_OF_RESOURCES = 0xA700


def test_redis_killed_under_load_loses_no_job(tmp_path: Path, redis_server: RedisServer) -> None:
    """Studies keep arriving while redis-server is killed and restarted: rings are lost, and
    the reconciler rings the jobs left "queued" again from SQL."""
    studies = [one_study(tmp_path / f"in{n}", 3, seed=100 + n) for n in range(6)]
    stack = make_stack(
        tmp_path / "stack",
        broker_url=redis_server.url,
        models=(DEMO,),
        ingest={"study_quiet_seconds": 0.5},
        worker={"queued_lease_seconds": 3.0, "heartbeat_lease_seconds": 10.0},
    )
    stack.serve()
    stack.worker()
    try:
        for files in studies[:2]:
            assert storescu(stack.port, files, aet="STORESCU").returncode == 0
        redis_server.kill()
        for files in studies[2:5]:
            assert storescu(stack.port, files, aet="STORESCU").returncode == 0
        wait_for(
            lambda: stack.scalar("SELECT count(*) FROM jobs") >= 5,
            30,
            "jobs created while redis is down",
            details=stack.logs,
        )
        redis_server.start()
        assert storescu(stack.port, studies[5], aet="STORESCU").returncode == 0
        stack.wait_jobs_done(len(studies), 180)
        assert stack.scalar("SELECT count(*) FROM instances") == 3 * len(studies)
        reasons = [
            str(row[0])
            for row in stack.query("SELECT detail FROM audit_events WHERE action = 'job.enqueued'")
        ]
        assert any("re-enqueued" in reason for reason in reasons), reasons
    finally:
        stack.stop()


def test_postgresql_down_answers_out_of_resources_and_recovers(tmp_path: Path) -> None:
    files = one_study(tmp_path / "in", 4, seed=21)
    with RestartablePostgres() as postgres:
        url = postgres.create_database("dicomai_outage")
        stack = make_stack(tmp_path / "stack", db_url=url)
        stack.serve()
        try:
            assert store_status(stack.port, files[0]) == 0
            postgres.halt()
            statuses = [store_status(stack.port, path) for path in files[1:]]
            assert statuses == [OUT_OF_RESOURCES] * 3, statuses
            # Nothing half-stored: the spool holds exactly the one instance with a row.
            names = {p.name for p in stack.spool_files()}
            assert names == {files[0].name}, names

            postgres.resume()
            # Recovers by itself: the first store after the outage may find a dead pooled
            # connection; pre-ping replaces it, so every store now succeeds.
            statuses = [store_status(stack.port, path) for path in files[1:]]
            assert statuses == [0] * 3, statuses
            rows = {
                f"{uid}.dcm" for (uid,) in stack.query("SELECT sop_instance_uid FROM instances")
            }
            assert rows == {p.name for p in files}
            assert {p.name for p in stack.spool_files()} == rows
            wait_for(
                lambda: stack.query("SELECT state FROM studies") == [("complete",)],
                30,
                "the study to complete once PostgreSQL is back",
                details=stack.logs,
            )
        finally:
            stack.stop()


def test_pacs_down_deliveries_retry_with_backoff_and_complete_when_it_returns(
    tmp_path: Path,
) -> None:
    pacs = PinnedOrthanc(tmp_path / "orthanc")
    pacs.start()
    pacs.stop(graceful=True)
    files = one_study(tmp_path / "in", 2, seed=31)
    stack = make_stack(
        tmp_path / "stack",
        embedded_worker=True,
        models=(DEMO,),
        destinations=[
            {"name": "pacs", "ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port}
        ],
        delivery={"backoff_initial_seconds": 0.5, "backoff_max_seconds": 2.0},
        worker={"delivery_lease_seconds": 10.0},
    )
    stack.serve()
    try:
        assert storescu(stack.port, files, aet="STORESCU").returncode == 0
        stack.wait_jobs_done(1, 120)
        wait_for(
            lambda: stack.scalar("SELECT min(attempts) FROM deliveries") >= 3,
            60,
            "three failed attempts of every delivery",
            details=stack.logs,
        )
        assert stack.query("SELECT DISTINCT state FROM deliveries") == [("pending",)]
        retries = stack.scalar("SELECT count(*) FROM audit_events WHERE action = 'delivery.retry'")
        assert retries >= 3 * 3

        pacs.start()
        expected = stack.scalar("SELECT count(*) FROM deliveries")
        wait_for(
            lambda: (
                stack.query("SELECT state, count(*) FROM deliveries GROUP BY state")
                == [("sent", expected)]
            ),
            60,
            "every delivery sent once Orthanc is back",
            details=stack.logs,
        )
        assert pacs.count_instances() == expected == 1 + len(files)
    finally:
        stack.stop()
        pacs.stop()


@pytest.fixture
def small_disk(tmp_path: Path):
    """A 16 MiB tmpfs: a disk that really fills up (needs root, as this sandbox has)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m,mode=0700", "tmpfs", str(mount)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs (run as root): {result.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path, leave_bytes: int) -> Path:
    """Grow a filler file until `leave_bytes` (about) are free on `disk`."""
    filler = disk / "filler"
    stat = os.statvfs(disk)
    free = stat.f_bavail * stat.f_frsize
    with filler.open("ab") as out, contextlib.suppress(OSError):
        out.write(b"\xff" * max(free - leave_bytes, 0))
    return filler


def big_image(source: Path, target: Path, side: int) -> Path:
    ds = pydicom.dcmread(source)
    ds.Rows = ds.Columns = side
    ds.PixelData = bytes(side * side * 2)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(target, enforce_file_format=True)
    return target


def test_disk_full_answers_out_of_resources_leaves_no_partial_file_and_recovers(
    tmp_path: Path, small_disk: Path
) -> None:
    small = one_study(tmp_path / "in", 1, seed=41)[0]
    large = big_image(small, tmp_path / "large.dcm", 2048)  # 8 MiB
    stack = make_stack(
        tmp_path / "stack",
        db_url=f"sqlite:///{tmp_path / 'dicomai.db'}",
        storage={"dir": str(small_disk / "var"), "min_free_mb": 1},
    )
    stack.serve()
    try:
        # The disk fills during the write (3 MiB free, above the 1 MiB watermark).
        filler = fill(small_disk, 3 << 20)
        assert store_status(stack.port, large) == OUT_OF_RESOURCES
        assert stack.spool_files() == [], "a partial file stayed after ENOSPC"
        assert "No space left on device" in stack.logs()
        # Below the watermark no write starts.
        fill(small_disk, 512 << 10)
        assert store_status(stack.port, small) == OUT_OF_RESOURCES
        assert stack.spool_files() == []
        assert stack.scalar("SELECT count(*) FROM instances") == 0
        assert "free-space watermark" in stack.logs()
        # Each refusal is in the audit trail, with why.
        reasons = [
            reason
            for (reason,) in stack.query(
                "SELECT detail FROM audit_events WHERE action = 'instance.rejected' ORDER BY id"
            )
        ]
        assert len(reasons) == 2, reasons
        assert "No space left" in reasons[0] and "watermark" in reasons[1], reasons

        filler.unlink()  # space returns: no restart needed
        assert store_status(stack.port, large) == 0
        assert store_status(stack.port, small) == 0
        assert sorted(p.name for p in stack.spool_files()) == sorted(
            f"{uid}.dcm" for (uid,) in stack.query("SELECT sop_instance_uid FROM instances")
        )
        assert len(stack.spool_files()) == 2
    finally:
        stack.stop()
