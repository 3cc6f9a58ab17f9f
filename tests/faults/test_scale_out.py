"""Scale-out: two worker processes against one Redis and one PostgreSQL share the jobs.

As on two machines (docs/operations.md "Scale out"): each worker is its own `dicomai worker`
process with its own log, the spool is the one folder both read, and SQL decides who runs what.
Every job runs once, on one of them, and both take part.
"""

from __future__ import annotations

import re
from pathlib import Path

from faultkit import DEMO, make_stack, one_study
from servers import RedisServer, storescu, wait_for

STUDIES = 8


def test_two_workers_share_the_jobs_and_run_each_once(
    tmp_path: Path, redis_server: RedisServer, postgres_url: str
) -> None:
    studies = [one_study(tmp_path / f"in{n}", 2, seed=300 + n) for n in range(STUDIES)]
    stack = make_stack(
        tmp_path / "stack",
        db_url=postgres_url,
        broker_url=redis_server.url,
        models=(DEMO,),
        ingest={"study_quiet_seconds": 0.5},
        # Each job alone: batching would let the first worker take its neighbours' jobs.
        worker={"batch_window_seconds": 0},
    )
    stack.serve()
    workers = [stack.worker("worker-a"), stack.worker("worker-b")]
    try:
        for daemon in workers:
            wait_for(lambda d=daemon: "ready." in d.log(), 120, f"{daemon.log_path.name} ready")
        for files in studies:
            assert storescu(stack.port, files, aet="STORESCU").returncode == 0
        wait_for(
            lambda: stack.query("SELECT count(*) FROM jobs WHERE state = 'done'") == [(STUDIES,)],
            180,
            "every job done",
            details=stack.logs,
        )
        assert stack.query("SELECT DISTINCT attempts FROM jobs") == [(1,)]
        assert stack.query("SELECT count(*) FROM output_objects WHERE kind = 'sr'") == [(STUDIES,)]
        ran = [_jobs_run(daemon.log()) for daemon in workers]
        assert all(ran), f"a worker ran no job: {ran}"
        assert not ran[0] & ran[1], f"jobs run by both workers: {ran[0] & ran[1]}"
        (job_ids,) = zip(*stack.query("SELECT id FROM jobs"), strict=True)
        assert ran[0] | ran[1] == set(job_ids)
    finally:
        stack.stop()


def _jobs_run(log: str) -> set[int]:
    """The jobs a worker's log says it ran (its per-run timing line, `jobs [3], 2 images: ...`)."""
    return {
        int(job)
        for listed in re.findall(r"jobs \[([\d, ]+)\], \d+ images", log)
        for job in listed.split(", ")
    }
