"""Worker scaling: images/s of 1 and 2 worker processes on this machine, one SQL queue.

N one-image studies are queued in one SQLite database (the embedded default); each worker
process runs `JobRunner.run_job` on the oldest queued job until none is left, as a Celery
worker does with its doorbells (a job another worker took, alone or in its batch, is skipped
by the claim). Cross-job batching is on, at most --max-batch images a pass (default 4, so
that the queue splits into batches enough for two workers to share).

Threads: each process is pinned to its share of the cores (``os.sched_setaffinity``, what
systemd's CPUAffinity= or a container's cpuset does), and the worker then runs one torch
thread per core it may use: 1 process of 2 threads against 2 processes of 1 thread. The third
row leaves both processes on every core (2 processes of 2 threads on 2 cores) to show why.

    .venv/bin/python bench/scaling.py                       # demo tinycnn and resnet50
    .venv/bin/python bench/scaling.py --models tinycnn --jobs 48
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
import time
from multiprocessing.synchronize import Event, Lock
from pathlib import Path

from sqlalchemy import select, update

sys.path.insert(0, str(Path(__file__).parent))
from pipeline import Site, demo_package

from dicomai.db.models import Job, JobState


def worker(
    site_root: Path,
    package: Path,
    cores: list[int],
    warm_up_job: int,
    batch: int,
    warm_up_lock: Lock,
    ready: mp.Queue,  # type: ignore[type-arg]
    start: Event,
) -> None:
    """One worker process: pinned to `cores`, warmed up on its own job, then drains the queue."""
    os.sched_setaffinity(0, cores)
    from dicomai.jobs.runner import JobRunner

    site = Site(site_root, package, create=False)
    sessions = site.sessions
    settings = site.settings.model_copy(
        update={"worker": site.settings.worker.model_copy(update={"max_batch_images": batch})}
    )
    runner = JobRunner(settings, sessions, device="cpu")
    with warm_up_lock:  # alone in the queue: the warm-up batches with nothing
        with sessions() as session, session.begin():
            session.execute(update(Job).where(Job.id == warm_up_job).values(state=JobState.QUEUED))
        runner.run_job(warm_up_job)
    ready.put(os.getpid())
    start.wait()
    while True:
        with sessions() as session:
            job_id = session.scalar(
                select(Job.id).where(Job.state == JobState.QUEUED).order_by(Job.id).limit(1)
            )
        if job_id is None:
            return
        runner.run_job(job_id)


def run(site: Site, package: Path, jobs: list[int], layout: list[list[int]], batch: int) -> float:
    """Images/s of one worker process per entry of `layout` (the cores it is pinned to)."""
    warm_ups = site.ingest(len(layout), 1, site.image_size)
    with site.sessions() as session, session.begin():
        session.execute(
            update(Job).where(Job.id.in_(jobs + warm_ups)).values(state=JobState.CANCELLED)
        )
    context = mp.get_context("spawn")  # no torch state forked into the workers
    lock, ready, start = context.Lock(), context.Queue(), context.Event()
    processes = [
        context.Process(
            target=worker, args=(site.root, package, cores, warm_up, batch, lock, ready, start)
        )
        for cores, warm_up in zip(layout, warm_ups, strict=True)
    ]
    for process in processes:
        process.start()
    for _ in processes:
        ready.get(timeout=600)
    with site.sessions() as session, session.begin():
        session.execute(
            update(Job).where(Job.id.in_(jobs)).values(state=JobState.QUEUED, attempts=0)
        )
    started = time.perf_counter()
    start.set()
    for process in processes:
        process.join()
    seconds = time.perf_counter() - started
    with site.sessions() as session:
        rows = session.execute(select(Job.state, Job.attempts).where(Job.id.in_(jobs))).all()
    assert all(state == JobState.DONE for state, _ in rows), rows
    twice = sum(attempts != 1 for _, attempts in rows)
    assert twice == 0, f"{twice} jobs ran more than once"
    return len(jobs) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", default=["tinycnn", "resnet50"])
    parser.add_argument("--jobs", type=int, default=32, help="queued one-image studies")
    parser.add_argument("--image-size", type=int, default=512, help="rows = columns of the DX")
    # Small, so that the queue splits into enough batches for two workers to share.
    parser.add_argument("--max-batch", type=int, default=4, help="[worker] max_batch_images")
    args = parser.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    half = len(cores) // 2 or 1
    layouts = {
        f"1 process × {len(cores)} threads": [cores],
        f"2 processes × {half} thread(s), pinned": [cores[:half], cores[half:] or cores],
        f"2 processes × {len(cores)} threads, unpinned": [cores, cores],
    }
    print(
        f"{len(cores)} cores, {args.jobs} one-image {args.image_size}² DX studies queued, "
        f"batches of at most {args.max_batch}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for architecture in args.models:
            package = demo_package(architecture, Path(tmp) / architecture)
            site = Site(Path(tmp) / f"site-{architecture}", package, args.image_size)
            jobs = site.ingest(args.jobs, 1, args.image_size)
            print(
                f"\n### {architecture}\n| workers | images/s | ÷ 1 process |\n| --- | ---: | ---: |"
            )
            first = None
            for name, layout in layouts.items():
                rate = run(site, package, jobs, layout, args.max_batch)
                first = first or rate
                print(f"| {name} | {rate:.1f} | {rate / first:.2f} |", flush=True)


if __name__ == "__main__":
    main()
