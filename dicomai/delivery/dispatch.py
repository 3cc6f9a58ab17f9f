"""Attempting one delivery row: send, then record success, a scheduled retry, or failure."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from sqlalchemy import select, update
from sqlalchemy.orm import Session, selectinload, sessionmaker

from dicomai.audit import Action, record
from dicomai.config import Destination, Settings
from dicomai.db.clock import database_now
from dicomai.db.models import Delivery, DeliveryState, Job, OutputObject, utcnow
from dicomai.delivery.folder import copy_file
from dicomai.delivery.policy import backoff_seconds, gives_up
from dicomai.delivery.scu import send_files
from dicomai.errors import DeliveryError
from dicomai.metrics import DELIVERIES, DeliveryOutcome

log = logging.getLogger(__name__)

DELIVERY = "delivery"


def send_to(
    destination: Destination,
    paths: list[Path],
    settings: Settings,
    on_sent: Callable[[], None] | None = None,
) -> list[str | None]:
    """Send files to one destination; return each file's error, or None once it is stored.
    `on_sent` is called after each file."""
    if destination.path is not None:
        return [_copy(path, destination.path, on_sent) for path in paths]
    assert destination.ae_title and destination.host and destination.port
    outcomes = send_files(
        paths,
        ae_title=destination.ae_title,
        host=destination.host,
        port=destination.port,
        calling_ae=settings.ingest.ae_title,
        timeout=settings.delivery.timeout_seconds,
        on_sent=on_sent,
    )
    return [None if error is None else str(error) for error in outcomes]


def _copy(path: Path, folder: Path, on_sent: Callable[[], None] | None) -> str | None:
    try:
        copy_file(path, folder)
    except DeliveryError as exc:
        return str(exc)
    finally:
        if on_sent is not None:
            on_sent()
    return None


def attempt_delivery(sessions: sessionmaker[Session], settings: Settings, delivery_id: int) -> bool:
    """Try delivery `delivery_id` once if it is due; return whether it is sent."""
    return attempt_deliveries(sessions, settings, [delivery_id]) == 1


def attempt_deliveries(
    sessions: sessionmaker[Session], settings: Settings, delivery_ids: list[int]
) -> int:
    """Try the ones of `delivery_ids` that are due and that no other attempt holds, one
    association per destination; count sent."""
    by_destination: dict[str, list[tuple[int, Path]]] = {}
    token = uuid.uuid4().hex
    with sessions() as session, session.begin():
        claimed = claim_due(session, delivery_ids, settings.worker.delivery_lease_seconds, token)
        for delivery in session.scalars(select(Delivery).where(Delivery.id.in_(claimed))):
            path = settings.outputs_dir / delivery.output.path
            by_destination.setdefault(delivery.destination, []).append((delivery.id, path))
    groups = list(by_destination.items())
    if len(groups) <= 1:
        return sum(
            _attempt_destination(sessions, settings, token, name, items) for name, items in groups
        )
    # A destination that does not answer holds its attempt for the timeout: each destination
    # has its own thread, so that the others' objects are not held back behind it.
    with ThreadPoolExecutor(len(groups), thread_name_prefix="deliver") as pool:
        counts = pool.map(
            lambda group: _attempt_destination(sessions, settings, token, *group), groups
        )
        return sum(counts)


def _attempt_destination(
    sessions: sessionmaker[Session],
    settings: Settings,
    token: str,
    name: str,
    items: list[tuple[int, Path]],
) -> int:
    """Send deliveries claimed with `token` to destination `name` and record each outcome;
    count sent."""
    lease = _Lease(sessions, [delivery_id for delivery_id, _ in items], settings, token)
    destination = next((d for d in settings.destinations if d.name == name), None)
    if destination is None:
        errors: list[str | None] = [f"destination {name!r} is no longer configured"] * len(items)
    else:
        errors = _sent_or_failed(destination, [path for _, path in items], settings, lease.keep)
    outcomes = [(delivery_id, error) for (delivery_id, _), error in zip(items, errors, strict=True)]
    return _record_outcomes(sessions, settings, outcomes, token)


class _Lease:
    """The claim on deliveries being sent, renewed while they are: a PACS that takes seconds
    an object outlasted a claim renewed only before the association, and a second worker
    sent the same objects again."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        delivery_ids: list[int],
        settings: Settings,
        token: str,
    ) -> None:
        self._sessions = sessions
        self._ids = delivery_ids
        self._token = token
        self._seconds = settings.worker.delivery_lease_seconds
        self._renewed = time.monotonic()  # the claim itself set the lease a moment ago

    def renew(self) -> None:
        with self._sessions() as session, session.begin():
            session.execute(
                update(Delivery)
                .where(
                    Delivery.id.in_(
                        # The lock order of the claim and of recording outcomes (PostgreSQL).
                        select(Delivery.id)
                        .where(
                            Delivery.id.in_(self._ids),
                            Delivery.state == DeliveryState.PENDING,
                            # Taken over after a lapse: the other attempt's lease is its own.
                            Delivery.claim_token == self._token,
                        )
                        .order_by(Delivery.id)
                        .with_for_update()
                    )
                )
                .values(next_attempt_at=database_now(self._seconds))
                .execution_options(synchronize_session=False)
            )
        self._renewed = time.monotonic()

    def keep(self) -> None:
        """Renew once a quarter of the lease has passed (called after each object)."""
        if time.monotonic() - self._renewed < self._seconds / 4:
            return
        try:
            self.renew()
        except Exception as exc:  # a missed renewal only risks an overlapping attempt
            log.warning("delivery lease not renewed: %s", type(exc).__name__)


def _sent_or_failed(
    destination: Destination, paths: list[Path], settings: Settings, on_sent: Callable[[], None]
) -> list[str | None]:
    """`send_to`, with a failure nobody foresaw counted as a failed attempt of every object,
    so that the backoff and `max_attempts` apply instead of the lease, forever."""
    try:
        return send_to(destination, paths, settings, on_sent)
    except Exception as exc:  # its message may quote the object's content: the type only
        log.error("delivery to %s failed: %s", destination.name, type(exc).__name__)
        return [f"sending failed: {type(exc).__name__}"] * len(paths)


def claim_due(
    session: Session, delivery_ids: list[int], lease_seconds: float, token: str
) -> list[int]:
    """Take the pending ones of `delivery_ids` whose next attempt is due for one attempt,
    marked with the attempt's `token`; return their ids.

    The claim moves the next attempt a lease ahead in one conditional UPDATE, so that of the
    worker sending a new object, the task rung for it and a task Celery delivers twice,
    only one attempts it, and none before the backoff of its last failure has passed. An
    attempt that dies without an outcome leaves the delivery due again a lease later. The
    claim answers the last ring: the next due time is rung for at once. Due and lease are
    the database's clock (`database_now`), whatever the clocks of the machines claiming.
    """
    return list(
        session.scalars(
            update(Delivery)
            .where(
                Delivery.id.in_(
                    # One lock order, and rows another claim holds skipped (PostgreSQL).
                    select(Delivery.id)
                    .where(
                        Delivery.id.in_(delivery_ids),
                        Delivery.state == DeliveryState.PENDING,
                        Delivery.next_attempt_at <= database_now(),
                    )
                    .order_by(Delivery.id)
                    .with_for_update(skip_locked=True)
                )
            )
            .values(next_attempt_at=database_now(lease_seconds), rung_at=None, claim_token=token)
            .returning(Delivery.id)
            .execution_options(synchronize_session=False)
        )
    )


def _record_outcomes(
    sessions: sessionmaker[Session],
    settings: Settings,
    outcomes: list[tuple[int, str | None]],
    token: str,
) -> int:
    """Record each outcome (None: sent) of the attempt that claimed with `token`, in one
    transaction; count those sent.

    One commit for all of a destination's objects: a 100-image study's overlays took a commit
    (and its fsync) each. The rows are locked in id order before the first audit row, the
    order every other writer of deliveries and the audit chain takes.
    """
    for delivery_id, error in outcomes:
        if error is not None:
            log.warning("delivery %d failed: %s", delivery_id, error)
    with sessions() as session, session.begin():
        rows = session.scalars(
            select(Delivery)
            .where(Delivery.id.in_([delivery_id for delivery_id, _ in outcomes]))
            .order_by(Delivery.id)
            .with_for_update()
            .options(
                selectinload(Delivery.output).selectinload(OutputObject.job).selectinload(Job.study)
            )
        )
        errors = dict(outcomes)
        recorded: list[DeliveryOutcome] = []
        for delivery in rows:
            if delivery.state != DeliveryState.PENDING or delivery.claim_token != token:
                # An attempt that outlived its lease: another one holds the delivery, or has
                # recorded its outcome; that one stands.
                continue
            error = errors[delivery.id]
            if error is None:
                _sent(session, delivery)
                recorded.append(DeliveryOutcome.SENT)
            else:
                recorded.append(_failed(session, settings, delivery, error))
    # Counted once committed, as the rows say.
    for outcome in recorded:
        DELIVERIES.labels(outcome=outcome).inc()
    return recorded.count(DeliveryOutcome.SENT)


def _sent(session: Session, delivery: Delivery) -> None:
    delivery.state = DeliveryState.SENT
    delivery.attempts += 1
    delivery.delivered_at = utcnow()
    delivery.last_error = None
    record(
        session,
        Action.DELIVERY_SENT,
        actor=DELIVERY,
        object_type="delivery",
        object_id=delivery.id,
        study_uid=_study_uid(delivery),
        destination=delivery.destination,
        sop_instance_uid=delivery.output.sop_instance_uid,
    )


def _failed(
    session: Session, settings: Settings, delivery: Delivery, error: str
) -> DeliveryOutcome:
    """Record a failed attempt: retried after the backoff, or failed for good; which."""
    delivery.attempts += 1
    delivery.last_error = error
    if gives_up(delivery.attempts, settings.delivery):
        delivery.state = DeliveryState.FAILED
        action, outcome = Action.DELIVERY_FAILED, DeliveryOutcome.FAILED
    else:
        wait = backoff_seconds(delivery.attempts, settings.delivery)
        delivery.next_attempt_at = database_now(wait)
        action, outcome = Action.DELIVERY_RETRY, DeliveryOutcome.RETRYING
    record(
        session,
        action,
        actor=DELIVERY,
        object_type="delivery",
        object_id=delivery.id,
        study_uid=_study_uid(delivery),
        destination=delivery.destination,
        attempts=delivery.attempts,
        error=error,
    )
    return outcome


def has_deliveries(session: Session, job_id: int) -> bool:
    """Whether any of a job's outputs was given to a destination (its report is sending)."""
    first = session.scalar(
        select(Delivery.id).join(OutputObject).where(OutputObject.job_id == job_id).limit(1)
    )
    return first is not None


def pending_for_job(sessions: sessionmaker[Session], job_id: int) -> list[int]:
    """The ids of a job's deliveries that are still pending."""
    with sessions() as session:
        return list(
            session.scalars(
                select(Delivery.id)
                .join(OutputObject)
                .where(OutputObject.job_id == job_id, Delivery.state == DeliveryState.PENDING)
            )
        )


def _study_uid(delivery: Delivery) -> str:
    return delivery.output.job.study.study_uid
