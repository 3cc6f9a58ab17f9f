"""Load: eight senders at once for a bounded time; everything stored and processed, the
listener's memory bounded, no association refused below `max_associations`."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

from faultkit import DEMO, make_stack, one_study, rss_kb
from servers import require_program

SENDERS = 8
STUDIES_PER_SENDER = 6
IMAGES_PER_STUDY = 5
SEND_SECONDS = 20.0
RSS_BOUND_MB = 400


def test_eight_concurrent_senders_all_stored_and_processed_with_bounded_memory(
    tmp_path: Path,
) -> None:
    studies = [
        [
            one_study(
                tmp_path / f"s{sender}" / f"{n}", IMAGES_PER_STUDY, seed=1000 + 10 * sender + n
            )
            for n in range(STUDIES_PER_SENDER)
        ]
        for sender in range(SENDERS)
    ]
    stack = make_stack(
        tmp_path / "stack",
        embedded_worker=True,
        models=(DEMO,),
        ingest={"max_associations": 16, "study_quiet_seconds": 1.0},
    )
    serve = stack.serve()
    assert serve.process is not None
    pid = serve.process.pid
    binary = require_program("storescu", "dcmtk")
    peak = [rss_kb(pid)]
    done = threading.Event()

    def sample_memory() -> None:
        while not done.wait(0.1):
            peak[0] = max(peak[0], rss_kb(pid))

    failures: list[str] = []
    sent = [0] * SENDERS

    def send(sender: int) -> None:
        deadline = time.monotonic() + SEND_SECONDS
        for files in studies[sender]:
            if time.monotonic() > deadline:
                return
            argv = [binary, "-aet", "STORESCU", "-aec", "DICOMAI", "127.0.0.1", str(stack.port)]
            result = subprocess.run(
                argv + [str(f) for f in files],
                capture_output=True,
                text=True,
                timeout=60,
                env={**os.environ, "TCP_NODELAY": "1"},
                check=False,
            )
            if result.returncode != 0:
                failures.append(f"sender {sender}: {result.stderr[-500:]}")
                return
            sent[sender] += len(files)

    sampler = threading.Thread(target=sample_memory)
    sampler.start()
    threads = [threading.Thread(target=send, args=(n,)) for n in range(SENDERS)]
    started = time.monotonic()
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(SEND_SECONDS + 90)
        elapsed = time.monotonic() - started
        assert not failures, "\n".join(failures)
        total = sum(sent)
        assert stack.scalar("SELECT count(*) FROM instances") == total
        study_count = total // IMAGES_PER_STUDY
        stack.wait_jobs_done(study_count, 240)
        assert stack.scalar("SELECT count(*) FROM jobs") == study_count
        assert stack.scalar("SELECT count(*) FROM predictions WHERE evaluated") == total
        rejected = stack.scalar(
            "SELECT count(*) FROM audit_events WHERE action = 'association.rejected'"
        )
        assert rejected == 0
    finally:
        done.set()
        sampler.join()
        stack.stop()
    print(
        f"{SENDERS} senders: {total} instances in {elapsed:.1f} s "
        f"({total / elapsed:.0f}/s); serve peak RSS {peak[0] / 1024:.0f} MB"
    )
    assert peak[0] < RSS_BOUND_MB * 1024, f"serve RSS peaked at {peak[0] / 1024:.0f} MB"
