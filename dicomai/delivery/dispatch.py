"""Attempting one delivery row: send, then record success, a scheduled retry, or failure."""

from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicomai.audit import Action, record
from dicomai.config import Destination, Settings
from dicomai.db.models import Delivery, DeliveryState, OutputObject, utcnow
from dicomai.delivery.folder import copy_file
from dicomai.delivery.policy import backoff_seconds, gives_up
from dicomai.delivery.scu import send_file
from dicomai.errors import DeliveryError

log = logging.getLogger(__name__)

DELIVERY = "delivery"


def send_to(destination: Destination, path: Path, settings: Settings) -> None:
    """Send one file to one destination (raises DeliveryError)."""
    if destination.path is not None:
        copy_file(path, destination.path)
        return
    assert destination.ae_title and destination.host and destination.port
    send_file(
        path,
        ae_title=destination.ae_title,
        host=destination.host,
        port=destination.port,
        calling_ae=settings.ingest.ae_title,
        timeout=settings.delivery.timeout_seconds,
    )


def attempt_delivery(sessions: sessionmaker[Session], settings: Settings, delivery_id: int) -> bool:
    """Try delivery `delivery_id` once if it is still pending; return whether it is sent."""
    with sessions() as session:
        delivery = session.get(Delivery, delivery_id)
        if delivery is None or delivery.state != DeliveryState.PENDING:
            return delivery is not None and delivery.state == DeliveryState.SENT
        path = settings.outputs_dir / delivery.output.path
        name = delivery.destination
    destination = next((d for d in settings.destinations if d.name == name), None)
    try:
        if destination is None:
            raise DeliveryError(f"destination {name!r} is no longer configured")
        send_to(destination, path, settings)
    except DeliveryError as exc:
        _record_failure(sessions, settings, delivery_id, str(exc))
        return False
    _record_success(sessions, delivery_id)
    return True


def _record_success(sessions: sessionmaker[Session], delivery_id: int) -> None:
    with sessions() as session, session.begin():
        delivery = session.get_one(Delivery, delivery_id)
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


def _record_failure(
    sessions: sessionmaker[Session], settings: Settings, delivery_id: int, error: str
) -> None:
    log.warning("delivery %d failed: %s", delivery_id, error)
    with sessions() as session, session.begin():
        delivery = session.get_one(Delivery, delivery_id)
        delivery.attempts += 1
        delivery.last_error = error
        if gives_up(delivery.attempts, settings.delivery):
            delivery.state = DeliveryState.FAILED
            action = Action.DELIVERY_FAILED
        else:
            wait = backoff_seconds(delivery.attempts, settings.delivery)
            delivery.next_attempt_at = utcnow() + timedelta(seconds=wait)
            action = Action.DELIVERY_RETRY
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
