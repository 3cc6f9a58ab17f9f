"""The record of a refusal on the wire: an audit row, and the rejected-associations metric."""

from __future__ import annotations

import logging

from sqlalchemy.orm import Session, sessionmaker

from dicomai.audit import Action, record
from dicomai.metrics import REJECTED_ASSOCIATIONS

log = logging.getLogger(__name__)


def audit_refusal(
    sessions: sessionmaker[Session], action: Action, calling: str, address: str, reason: str
) -> None:
    """Write the refusal's audit row (and count a rejected association); the refusal stands
    even if the audit database is down."""
    if action == Action.ASSOCIATION_REJECTED:
        REJECTED_ASSOCIATIONS.labels(reason=reason).inc()
    try:
        with sessions() as session, session.begin():
            record(
                session,
                action,
                actor=calling,
                object_type="association",
                object_id=address,
                reason=reason,
            )
    except Exception:
        log.exception("could not audit: %s", reason)
