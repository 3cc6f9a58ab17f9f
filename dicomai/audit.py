"""Recording audit events, in the caller's transaction."""

from __future__ import annotations

import enum
import getpass
from typing import Any

from sqlalchemy.orm import Session

from dicomai.db.models import AuditEvent


class Action(enum.StrEnum):
    """Every audited action, named `subject.action`."""

    ASSOCIATION_REJECTED = "association.rejected"
    INSTANCE_STORED = "instance.stored"
    INSTANCE_DUPLICATE = "instance.duplicate"
    INSTANCE_REJECTED = "instance.rejected"
    INSTANCE_RESEND_KEPT = "instance.resend_kept"
    INSTANCE_REPLACED = "instance.replaced"
    STUDY_COMPLETED = "study.completed"
    JOB_CREATED = "job.created"
    JOB_ENQUEUED = "job.enqueued"
    JOB_STARTED = "job.started"
    JOB_DONE = "job.done"
    JOB_FAILED = "job.failed"
    OUTPUT_CREATED = "output.created"
    DELIVERY_SENT = "delivery.sent"
    DELIVERY_RETRY = "delivery.retry"
    DELIVERY_FAILED = "delivery.failed"
    MODEL_REGISTERED = "model.registered"
    MODEL_ACTIVATED = "model.activated"
    MODEL_RETIRED = "model.retired"
    DB_UPGRADED = "db.upgraded"


def os_user() -> str:
    """The operating-system user running this process, for admin actions."""
    try:
        return getpass.getuser()
    except OSError:
        return "unknown"


def record(
    session: Session,
    action: Action,
    *,
    actor: str,
    object_type: str,
    object_id: str | int | None = None,
    study_uid: str | None = None,
    **detail: Any,
) -> AuditEvent:
    """Add an audit row to `session`; it commits or rolls back with the change it records.

    `detail` must not hold patient data: UIDs, counts, states and reasons only.
    """
    event = AuditEvent(
        actor=actor[:64],
        action=action.value,
        object_type=object_type,
        object_id=None if object_id is None else str(object_id),
        study_uid=study_uid,
        detail=detail,
    )
    session.add(event)
    return event
