"""Celery tasks: doorbells that call dicomai's job runner and delivery by row id."""

from __future__ import annotations

from typing import Any

from celery import Celery

from workers.app import DELIVER, RUN_JOB


def register_tasks(app: Celery, runtime: Any) -> None:
    """Bind the tasks to `runtime` (a dicomai.jobs.runtime.WorkerRuntime)."""

    @app.task(name=RUN_JOB, acks_late=True)
    def run_job(job_id: int) -> None:
        runtime.run_job(job_id)

    @app.task(name=DELIVER, acks_late=True)
    def deliver(delivery_id: int) -> None:
        runtime.deliver(delivery_id)
