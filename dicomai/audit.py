"""Recording audit events, in the caller's transaction, as a tamper-evident hash chain.

Each row carries the hash of the row before it (`prev_hash`) and its own `hash`, the SHA-256
of a canonical JSON of its fields and `prev_hash`. Editing or deleting a row breaks the chain
at the row after it; `verify_chain` names the first row that does not fit. Removing the newest
rows, or rewriting every hash after an edit, is not detectable from the table alone: the head
hash that `dicomai audit verify` prints, kept elsewhere and passed back with `--expect-head`,
detects both.
"""

from __future__ import annotations

import enum
import getpass
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC
from typing import Any, cast

from sqlalchemy import Table, insert, select, text, update
from sqlalchemy.orm import Session

from dicomai.db.models import AuditEvent, utcnow

GENESIS = "0" * 64
# pg_advisory_xact_lock key of the audit chain ("dicomai" in ASCII, big-endian).
_CHAIN_LOCK = 0x6469636F6D6169
_HEAD = "dicomai.audit.head"


class Action(enum.StrEnum):
    """Every audited action, named `subject.action`."""

    ASSOCIATION_REJECTED = "association.rejected"
    ASSOCIATION_ABORTED = "association.aborted"
    REQUEST_REFUSED = "request.refused"
    INSTANCE_STORED = "instance.stored"
    INSTANCE_DUPLICATE = "instance.duplicate"
    INSTANCE_REJECTED = "instance.rejected"
    INSTANCE_RESEND_KEPT = "instance.resend_kept"
    INSTANCE_REPLACED = "instance.replaced"
    INSTANCE_DISCARDED = "instance.discarded"
    STUDY_COMPLETED = "study.completed"
    JOB_CREATED = "job.created"
    JOB_ENQUEUED = "job.enqueued"
    JOB_STARTED = "job.started"
    JOB_DONE = "job.done"
    JOB_FAILED = "job.failed"
    JOB_RETRIED = "job.retried"
    JOB_CANCELLED = "job.cancelled"
    OUTPUT_CREATED = "output.created"
    DELIVERY_SENT = "delivery.sent"
    DELIVERY_RETRY = "delivery.retry"
    DELIVERY_FAILED = "delivery.failed"
    DELIVERY_RETRIED = "delivery.retried"
    MODEL_REGISTERED = "model.registered"
    MODEL_SHADOWED = "model.shadowed"
    MODEL_CANARIED = "model.canaried"
    MODEL_ACTIVATED = "model.activated"
    MODEL_ROLLED_BACK = "model.rolled_back"
    MODEL_RETIRED = "model.retired"
    MODEL_GATE_OVERRIDDEN = "model.gate_overridden"
    MODEL_EVALUATED = "model.evaluated"
    DB_UPGRADED = "db.upgraded"


@dataclass(frozen=True)
class Operator:
    """Who asked for an admin action, with the command line they typed and why."""

    user: str
    command: str = ""
    reason: str = ""

    def detail(self) -> dict[str, str]:
        return {"command": self.command, "reason": self.reason}


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
) -> None:
    """Add an audit row in `session`'s transaction; it commits or rolls back with the change
    it records.

    `detail` must not hold patient data: UIDs, counts, states and reasons only. The row is
    chained to the newest row (see the module docstring); the chain head is read once per
    transaction, under a lock that other writers of audit rows wait for until this commits.
    """
    append(
        session,
        [
            event_row(
                action,
                actor=actor,
                object_type=object_type,
                object_id=object_id,
                study_uid=study_uid,
                **detail,
            )
        ],
    )


def event_row(
    action: Action,
    *,
    actor: str,
    object_type: str,
    object_id: str | int | None = None,
    study_uid: str | None = None,
    **detail: Any,
) -> dict[str, Any]:
    """The fields of one audit row, for `append` (the arguments are `record`'s)."""
    return {
        "at": utcnow(),
        "actor": actor[:64],
        "action": action.value,
        "object_type": object_type,
        "object_id": None if object_id is None else str(object_id),
        "study_uid": study_uid,
        "detail": json.loads(json.dumps(detail)),
    }


def append(session: Session, rows: list[dict[str, Any]]) -> None:
    """Chain `rows` (from `event_row`), in order, after the newest row, and insert them.

    They are Core inserts on the session's connection, one statement for all: every C-STORE
    writes a row, and the ORM's unit of work for it was a fifth of the listener's CPU time.
    """
    if not rows:
        return
    connection = session.connection()  # begins the transaction, so that it can key the head
    transaction = session.get_transaction()
    head = session.info.get(_HEAD)
    if head is not None and head[0] is transaction:
        previous = head[1]
    elif _lock_chain(session):
        # No other writer can append before this transaction ends: each row is inserted
        # once, with its hash.
        previous = connection.scalar(_NEWEST) or GENESIS
    else:
        # Inserted before the head is read: on SQLite the insert takes the write lock, so no
        # other writer can append between reading the head and committing this row. The
        # rest then follow the head this transaction now holds.
        first = rows[0]
        key = connection.execute(_INSERT, first).inserted_primary_key
        assert key is not None
        first["prev_hash"] = connection.scalar(_NEWEST.where(_TABLE.c.id < key[0])) or GENESIS
        first["hash"] = _hash(first)
        connection.execute(
            update(_TABLE).where(_TABLE.c.id == key[0]),
            {"prev_hash": first["prev_hash"], "hash": first["hash"]},
        )
        session.info[_HEAD] = (transaction, first["hash"])
        append(session, rows[1:])
        return
    for row in rows:
        row["prev_hash"] = previous
        row["hash"] = previous = _hash(row)
    connection.execute(_INSERT, rows[0] if len(rows) == 1 else rows)
    session.info[_HEAD] = (transaction, previous)


_TABLE = cast(Table, AuditEvent.__table__)
_INSERT = insert(_TABLE)
_NEWEST = select(_TABLE.c.hash).order_by(_TABLE.c.id.desc()).limit(1)


def _lock_chain(session: Session) -> bool:
    """Whether this transaction alone may append to the chain until it ends.

    PostgreSQL: it takes an advisory lock, held until commit or rollback, so appends are
    serialised across processes and their ids follow the chain. SQLite serialises writers
    itself: the transaction holds the write lock once it has written (pysqlite begins it
    at the first write), as when an instance's rows precede its audit row.
    """
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _CHAIN_LOCK})
        return True
    driver = session.connection().connection.driver_connection
    return bool(getattr(driver, "in_transaction", False))


_HASHED = ("at", "actor", "action", "object_type", "object_id", "study_uid", "detail", "prev_hash")


def canonical(event: AuditEvent) -> bytes:
    """The bytes an audit row's hash covers: its fields and `prev_hash`, as sorted JSON."""
    return _canonical({name: getattr(event, name) for name in _HASHED})


def _canonical(row: Mapping[str, Any]) -> bytes:
    fields = {name: row[name] for name in _HASHED}
    at = fields["at"]
    fields["at"] = (at.astimezone(UTC) if at.tzinfo else at.replace(tzinfo=UTC)).isoformat()
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def event_hash(event: AuditEvent) -> str:
    return hashlib.sha256(canonical(event)).hexdigest()


def _hash(row: Mapping[str, Any]) -> str:
    return hashlib.sha256(_canonical(row)).hexdigest()


@dataclass(frozen=True)
class ChainReport:
    """What `verify_chain` found: rows checked, unchained rows from before 0003, first break,
    and the newest row's id and hash (the head, to keep elsewhere)."""

    checked: int
    unchained: int
    broken_id: int | None = None
    problem: str = ""
    head_id: int | None = None
    head_hash: str | None = None

    @property
    def ok(self) -> bool:
        return not self.problem


def verify_chain(events: Iterable[AuditEvent], expect_head: str | None = None) -> ChainReport:
    """Check `events`, in id order, against their hashes and each other.

    Rows without a hash are accepted only before the first chained row (written before the
    migration that added the chain), and only if one follows: every row written since carries
    a hash, so a trail of unchained rows alone had its hashes removed.

    The chain is a plain SHA-256 one: whoever can write the table can rewrite every hash after
    an edit. `expect_head`, a head hash noted earlier outside the database, catches that: it
    must still be one of the chain's hashes.
    """
    checked = unchained = 0
    previous: str | None = None
    head_id: int | None = None
    anchored = expect_head is None
    for event in events:
        head_id = event.id
        if event.hash is None and previous is None:
            unchained += 1
            continue
        checked += 1
        expected_prev = previous or GENESIS
        if event.hash is None:
            return ChainReport(checked, unchained, event.id, "has no hash")
        if event.prev_hash != expected_prev:
            return ChainReport(checked, unchained, event.id, "does not follow the row before it")
        if event_hash(event) != event.hash:
            return ChainReport(checked, unchained, event.id, "content does not match its hash")
        previous = event.hash
        anchored = anchored or event.hash == expect_head
    if unchained and not checked:
        return ChainReport(0, unchained, head_id, "no row carries a hash: the chain was removed")
    if not anchored:
        return ChainReport(
            checked,
            unchained,
            None,
            f"the head noted earlier ({expect_head}) is no longer in the chain: rows were "
            "removed or rewritten since",
        )
    return ChainReport(checked, unchained, head_id=head_id, head_hash=previous)
