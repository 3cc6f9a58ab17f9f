"""kill -9 in the middle of the work: nothing a sender saw succeed is lost, nothing runs twice
where the PACS would see it."""

from __future__ import annotations

import threading
from pathlib import Path

import pydicom
from faultkit import AET, DEMO, DX, SENDER, Stack, association, kill9, make_stack, one_study
from pynetdicom import AE
from servers import OrthancServer, RedisServer, wait_for


def send_until_killed(stack: Stack, files: list[Path], kill_after: int) -> dict[str, int | None]:
    """Send `files` over one association; another thread kills serve after `kill_after`
    successes, while the sender keeps going. Return each file's status (None: no answer)."""
    statuses: dict[str, int | None] = {}
    succeeded = threading.Semaphore(0)
    serve = stack.processes[0]

    def killer() -> None:
        for _ in range(kill_after):
            succeeded.acquire()
        kill9(serve)

    thread = threading.Thread(target=killer)
    thread.start()
    ae = AE(ae_title=SENDER)
    ae.add_requested_context(DX, "1.2.840.10008.1.2.1")
    assoc = ae.associate("127.0.0.1", stack.port, ae_title=AET)
    assert assoc.is_established
    for path in files:
        status = None
        if assoc.is_established:
            try:
                answer = assoc.send_c_store(path)
                status = int(answer.Status) if answer and "Status" in answer else None
            except (RuntimeError, OSError):
                status = None
        statuses[path.name] = status
        if status == 0:
            succeeded.release()
    if assoc.is_established:
        assoc.abort()
    thread.join(30)
    return statuses


def test_kill9_of_serve_mid_association_loses_no_acknowledged_instance(tmp_path: Path) -> None:
    files = one_study(tmp_path / "in", 60, seed=11, size=256)
    stack = make_stack(tmp_path / "stack")
    stack.serve()
    try:
        statuses = send_until_killed(stack, files, kill_after=10)
        acknowledged = {name for name, status in statuses.items() if status == 0}
        failed = {name for name, status in statuses.items() if status != 0}
        print(f"acknowledged before the kill: {len(acknowledged)}, failed: {len(failed)}")
        assert len(acknowledged) >= 10
        assert failed, "the kill came too late: every instance was acknowledged"
        assert all(statuses[name] is None for name in failed), statuses

        rows = {
            f"{uid}.dcm": path
            for uid, path in stack.query("SELECT sop_instance_uid, path FROM instances")
        }
        for name in acknowledged:
            assert name in rows, f"acknowledged instance {name} has no row after kill -9"
            stored = stack.spool() / rows[name]
            assert stored.is_file(), f"acknowledged instance {name} has no file"
            ds = pydicom.dcmread(stored)
            assert f"{ds.SOPInstanceUID}.dcm" == name
            assert ds.pixel_array.shape == (256, 256)
        for path in rows.values():
            assert not path.endswith(".tmp") and not Path(path).name.startswith(".")
            assert (stack.spool() / path).is_file(), f"row without a file: {path}"

        # Back up: the rest is sent again, and the study completes.
        stack.serve()
        with association(stack.port, [(DX, "1.2.840.10008.1.2.1")]) as assoc:
            for path in files:
                answer = assoc.send_c_store(path)
                assert answer.Status == 0, f"resend of {path.name} after restart failed"
        assert stack.scalar("SELECT count(*) FROM instances") == len(files)
        wait_for(
            lambda: (
                stack.query("SELECT state, instance_count FROM studies")
                == [("complete", len(files))]
            ),
            30,
            "the study to complete after restart",
            details=stack.logs,
        )
        visible = [p for p in stack.spool_files() if not p.name.startswith(".")]
        assert len(visible) == len(files)
    finally:
        stack.stop()


def test_kill9_of_worker_mid_job_runs_the_job_again_and_the_pacs_sees_each_output_once(
    tmp_path: Path, redis_server: RedisServer, orthanc: OrthancServer
) -> None:
    files = one_study(tmp_path / "in", 24, seed=12, size=256)
    stack = make_stack(
        tmp_path / "stack",
        broker_url=redis_server.url,
        models=(DEMO,),
        worker={"heartbeat_lease_seconds": 3.0, "queued_lease_seconds": 6.0},
        destinations=[
            {
                "name": "pacs",
                "ae_title": orthanc.aet,
                "host": "127.0.0.1",
                "port": orthanc.dicom_port,
            }
        ],
    )
    stack.serve()
    worker = stack.worker("worker-1")
    try:
        with association(stack.port, [(DX, "1.2.840.10008.1.2.1")]) as assoc:
            for path in files:
                assert assoc.send_c_store(path).Status == 0
        wait_for(
            lambda: stack.query("SELECT state FROM jobs") == [("running",)],
            120,
            "the job to start",
            details=stack.logs,
        )
        kill9(worker)
        assert stack.query("SELECT state, attempts FROM jobs") == [("running", 1)], (
            "the job finished before the worker was killed: make it longer"
        )
        sent_before = stack.scalar("SELECT count(*) FROM deliveries WHERE state = 'sent'")

        stack.worker("worker-2")
        stack.wait_jobs_done(1, 180)
        outputs = stack.query("SELECT sop_instance_uid FROM output_objects")
        expected = 1 + len(files)  # one SR, one overlay per image
        assert len(outputs) == expected
        wait_for(
            lambda: (
                stack.scalar("SELECT count(*) FROM deliveries WHERE state = 'sent'") == expected
            ),
            60,
            "every output delivered",
            details=stack.logs,
        )
        # Heartbeats kept the second run from being taken for abandoned: exactly two attempts.
        assert stack.query("SELECT attempts FROM jobs") == [(2,)]
        reasons = [
            row[0]
            for row in stack.query("SELECT detail FROM audit_events WHERE action = 'job.enqueued'")
        ]
        assert any("heartbeat lost" in str(reason) for reason in reasons), reasons
        assert orthanc.count_instances() == expected
        for (uid,) in outputs:
            assert orthanc.find_sop_instance(uid), f"output {uid} missing in Orthanc"
        print(f"deliveries sent before the kill: {sent_before}; after: {expected}")
    finally:
        stack.stop()
