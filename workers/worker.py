"""Running a Celery worker process bound to a dicomai JobRunner."""

from __future__ import annotations

import os

from dicomai.config import Settings
from dicomai.db.migrate import require_current
from dicomai.db.session import make_engine, make_sessionmaker
from workers.app import DELIVERY_QUEUE, INFERENCE_QUEUE, make_app
from workers.tasks import register_tasks


def node_name(device: str, pid: int | None = None) -> str:
    """The Celery node name of a worker on `device` (``cpu``, ``cuda:N``): ``dicomai-cuda1@%h``.

    One worker per GPU on a machine: with the device in the name, ``celery inspect`` and the
    log tell ``dicomai-worker@0`` from ``dicomai-worker@1``, which all were ``dicomai@host``.
    CPU workers, of which a machine may run several, add their process id
    (``dicomai-cpu-4711@%h``): under one name, Celery's remote control reached only one.
    """
    name = device.replace(":", "")
    if device == "cpu":
        name = f"{name}-{os.getpid() if pid is None else pid}"
    return f"dicomai-{name}@%h"


def run_worker(settings: Settings, device: str) -> None:
    """Consume inference and delivery tasks until stopped; one task at a time (solo pool).

    The solo pool keeps torch and CUDA in this process: nothing forks after the model loads.
    """
    from dicomai.jobs.runner import JobRunner

    engine = make_engine(settings.database_url)
    # A worker updated before `serve` ran `db upgrade` must not write rows of the new schema
    # into the old one.
    require_current(engine, settings.database_url)
    sessions = make_sessionmaker(engine)
    runner = JobRunner(settings, sessions, device=device)
    runner.load_models_in_service()
    app = make_app(settings)
    register_tasks(app, runner)
    app.worker_main(
        [
            "worker",
            "--pool=solo",
            f"--queues={INFERENCE_QUEUE},{DELIVERY_QUEUE}",
            f"--hostname={node_name(device)}",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            f"--loglevel={settings.log_level}",
        ]
    )
