"""Running several workers: broker timeouts, database outages in a task, node names, and the
partial output files a killed worker leaves."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import pytest
from celery import Celery
from daemon import Listener
from kombu.exceptions import OperationalError as BrokerError
from servers import dropping_port, free_port

from dicomai.config import Settings
from dicomai.db.migrate import upgrade
from dicomai.db.session import make_engine, make_sessionmaker
from dicomai.jobs.runner import JobRunner
from workers.app import DELIVER, RUN_JOB, make_app
from workers.doorbell import CeleryDoorbell
from workers.tasks import register_tasks
from workers.worker import node_name, run_worker

MODALITY = "MODALITY"


# The kernel gives up on a dropped SYN after about 130 s: a ring that waits for it fails this.
@pytest.mark.timeout(60)
def test_a_ring_to_a_redis_that_drops_packets_fails_instead_of_hanging(tmp_path: Path) -> None:
    with dropping_port() as port:
        settings = Settings(
            broker={"url": f"redis://127.0.0.1:{port}/0"}, storage={"dir": str(tmp_path)}
        )
        doorbell = CeleryDoorbell(make_app(settings))
        with pytest.raises(BrokerError, match="Timeout"):
            doorbell.ring_job(1)


def test_a_database_outage_in_a_task_is_one_line_without_the_servers_address(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Nothing listens on the port: every session the worker opens fails, as in an outage.
    database = f"postgresql://dicomai@127.0.0.1:{free_port()}/dicomai"
    settings = Settings(database={"url": database}, storage={"dir": str(tmp_path)})
    runner = JobRunner(settings, make_sessionmaker(make_engine(database)), device="cpu")
    app = make_app(settings)
    register_tasks(app, runner)

    with caplog.at_level(logging.INFO):
        job = app.tasks[RUN_JOB].apply(args=[7])
        delivery = app.tasks[DELIVER].apply(args=[8])

    assert (job.state, delivery.state) == ("IGNORED", "IGNORED"), "the tasks did not end"
    ours = [r.getMessage() for r in caplog.records if r.name == "workers.tasks"]
    assert ours == [
        "job 7: database error (OperationalError); the reconciler rings it again after its lease",
        "delivery 8: database error (OperationalError); the reconciler rings it again after "
        "its lease",
    ]
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert "127.0.0.1" not in caplog.text


def test_a_task_that_fails_otherwise_still_fails(tmp_path: Path) -> None:
    class Broken:
        def run_job(self, job_id: int) -> None:
            raise RuntimeError("a bug")

    app = make_app(Settings(storage={"dir": str(tmp_path)}))
    register_tasks(app, Broken())

    assert app.tasks[RUN_JOB].apply(args=[7]).state == "FAILURE"


def test_each_device_has_its_own_worker_node_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = Settings(storage={"dir": str(tmp_path)})
    upgrade(settings.database_url)
    started: list[list[str]] = []
    monkeypatch.setattr(Celery, "worker_main", lambda app, argv: started.append(argv))

    run_worker(settings, "cpu")

    (argv,) = started
    assert f"--hostname=dicomai-cpu-{os.getpid()}@%h" in argv
    names = {node_name(device, pid=7) for device in ("cpu", "cuda:0", "cuda:1")}
    assert names == {"dicomai-cpu-7@%h", "dicomai-cuda0@%h", "dicomai-cuda1@%h"}
    # Two CPU workers on one machine are two nodes.
    assert node_name("cpu", pid=7) != node_name("cpu", pid=8)


def test_serve_removes_partial_output_files_of_killed_workers_at_start(tmp_path: Path) -> None:
    listener = Listener(
        tmp_path / "site", "DICOMAI", [{"ae_title": MODALITY, "hosts": ["127.0.0.1"]}]
    )
    study = listener.root / "var" / "outputs" / "1.2.3"
    study.mkdir(parents=True)
    # As `_write_outputs` names them: `.<final name>.<pid>.<thread>.tmp`.
    killed = study / ".2.25.1.dcm.4242.140000.tmp"
    writing = study / ".2.25.2.dcm.4343.140001.tmp"  # another machine's worker, at it now
    finished = study / "2.25.3.dcm"
    other = study / ".notes.tmp"  # not our naming: not ours to remove
    for path in (killed, writing, finished, other):
        path.write_bytes(b"\0" * 128)
    an_hour_ago = time.time() - 3600
    for path in (killed, finished, other):
        os.utime(path, (an_hour_ago, an_hour_ago))

    with listener:
        assert not killed.exists(), "a killed worker's partial output stayed"
        assert writing.exists(), "a partial output still being written was removed"
        assert finished.exists() and other.exists()
        assert "removed 1 partial output files" in listener.log()
