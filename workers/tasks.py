"""Celery tasks: doorbells that call dicomai's job runner and delivery by row id."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from celery import Celery
from celery.exceptions import Ignore

from dicomai.db.session import TRANSIENT_DATABASE_ERRORS
from workers.app import DELIVER, RUN_JOB

log = logging.getLogger(__name__)


def register_tasks(app: Celery, runtime: Any) -> None:
    """Bind the tasks to `runtime` (a dicomai.jobs.runner.JobRunner).

    Not shared with other apps (Celery's default): a second app in the process, a test's,
    called the first one's runtime.
    """

    @app.task(name=RUN_JOB, acks_late=True, shared=False)
    def run_job(job_id: int) -> None:
        with _left_to_reconciler("job", job_id):
            runtime.run_job(job_id)

    @app.task(name=DELIVER, acks_late=True, shared=False)
    def deliver(delivery_id: int) -> None:
        with _left_to_reconciler("delivery", delivery_id):
            runtime.deliver(delivery_id)


@contextmanager
def _left_to_reconciler(kind: str, row_id: int) -> Iterator[None]:
    """Log a database error as one line and end the task as ignored (Celery acknowledges it
    and logs "ignored" at INFO).

    Let out, Celery logged it as "raised unexpected" with the whole traceback, for every task
    of an outage; the traceback said nothing the line does not. The error's text (a host, a
    key's value) stays out of the log: only its types go in.
    """
    try:
        yield
    except TRANSIENT_DATABASE_ERRORS as exc:
        log.warning(
            "%s %d: database error (%s); the reconciler rings it again after its lease",
            kind,
            row_id,
            _error_types(exc),
        )
        raise Ignore() from None


def _error_types(exc: Exception) -> str:
    """`OperationalError`, or with the driver's error where it says more (`DeadlockDetected`)."""
    names = [type(exc).__name__]
    orig = getattr(exc, "orig", None)
    if orig is not None and type(orig).__name__ not in names:
        names.append(type(orig).__name__)
    return ": ".join(names)
