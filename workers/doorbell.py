"""The Celery doorbell: `send_task` by name, so the listener never imports torch."""

from __future__ import annotations

from celery import Celery

from workers.app import DELIVER, DELIVERY_QUEUE, INFERENCE_QUEUE, RUN_JOB


class CeleryDoorbell:
    """Rings a worker through the broker for a job or delivery row."""

    def __init__(self, app: Celery) -> None:
        self.app = app

    def ring_job(self, job_id: int) -> None:
        self.app.send_task(RUN_JOB, args=[job_id], queue=INFERENCE_QUEUE)

    def ring_delivery(self, delivery_id: int) -> None:
        self.app.send_task(DELIVER, args=[delivery_id], queue=DELIVERY_QUEUE)
