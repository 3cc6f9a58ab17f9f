"""The DICOM listener: the AE, association control and C-ECHO; C-STORE lives in store.py."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, cast

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, evt
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.sop_class import _STORAGE_CLASSES, Verification  # type: ignore[attr-defined]
from sqlalchemy.orm import Session, sessionmaker

from dicomai.audit import Action
from dicomai.config import Settings
from dicomai.ingest import transfers
from dicomai.ingest.access import AccessPolicy, Decision, is_health_probe
from dicomai.ingest.limits import Limits, bound_reads
from dicomai.ingest.protocol import bad_titles, drop_connection, guard_protocol
from dicomai.ingest.refusals import audit_refusal
from dicomai.ingest.spool import Spool
from dicomai.ingest.store import Storer
from dicomai.metrics import OPEN_ASSOCIATIONS
from dicomai.sockets import set_nodelay

log = logging.getLogger(__name__)


# Connections one address may have open before its associations are accepted, at least: a
# modality opens one or two at once; idle sockets of one peer must not take every slot.
PENDING_PER_ADDRESS = 4


def pending_per_address(max_associations: int) -> int:
    """Connections one address may keep waiting: as many as the associations it may be
    granted (a PACS forwarding with eight threads opens eight at once, and under load their
    requests are read late), and never fewer than `PENDING_PER_ADDRESS`."""
    return max(PENDING_PER_ADDRESS, max_associations)


def connection_cap(max_associations: int) -> int:
    """Open connections a listener process takes: the associations and room for callers still
    asking (bounded per address by `pending_per_address`)."""
    return 4 * max_associations + 8


def build_ae(settings: Settings) -> AE:
    """An AE that accepts every storage SOP class in every transfer syntax, and Verification."""
    ae = AE(ae_title=settings.ingest.ae_title)
    ae.maximum_pdu_size = settings.ingest.max_pdu
    ae.require_called_aet = True
    # pynetdicom counts every connection against its limit, one that has said nothing yet too:
    # anyone able to connect held every slot with idle sockets. Its limit is only the hard cap
    # of connections; `max_associations` counts associations let in (`on_requested`).
    ae.maximum_associations = connection_cap(settings.ingest.max_associations)
    ae.network_timeout = settings.ingest.network_timeout_seconds
    # pynetdicom's ARTIM: also how long a connection whose association request never came
    # whole keeps its slot.
    ae.acse_timeout = min(30.0, settings.ingest.network_timeout_seconds)
    ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
    for uid in _STORAGE_CLASSES.values():
        ae.add_supported_context(uid, ALL_TRANSFER_SYNTAXES)
    return ae


def handlers(
    settings: Settings, spool: Spool, sessions: sessionmaker[Session]
) -> list[tuple[Any, ...]]:
    """The event handlers of the listener, bound to their dependencies."""
    policy = AccessPolicy(settings.ingest.peers, settings.ingest.allow_any)
    limits = Limits(
        settings.ingest.max_pdu,
        settings.ingest.max_dataset_mb << 20,
        settings.ingest.network_timeout_seconds,
        min(30.0, settings.ingest.network_timeout_seconds),
    )
    return [
        (
            evt.EVT_CONN_OPEN,
            on_connection_open,
            [limits, sessions, policy, pending_per_address(settings.ingest.max_associations)],
        ),
        (evt.EVT_CONN_CLOSE, on_connection_close, [sessions]),
        (
            evt.EVT_REQUESTED,
            on_requested,
            [policy, settings.ingest.ae_title, sessions, settings.ingest.max_associations],
        ),
        (evt.EVT_REJECTED, on_rejected, [sessions]),
        (evt.EVT_C_ECHO, on_echo),
        (
            evt.EVT_C_STORE,
            Storer(
                spool,
                sessions,
                limits,
                settings.ingest.resend_policy,
                peers=policy.titles,
                track_transfers=settings.ingest.complete_on_association_end,
            ),
        ),
        # A release alone ends a transfer: an A-ABORT is a failed one, the sender sends again
        # (closed at the abort, a report on part of the study went out before the retry). An
        # aborted association's studies are left to the quiet period, and so are those of a
        # released one that had a store refused.
        (
            evt.EVT_RELEASED,
            on_association_end,
            [sessions, settings.ingest.study_max_wait_seconds],
        ),
    ]


def on_association_end(
    event: evt.Event, sessions: sessionmaker[Session], stale_after: float
) -> None:
    """Mark as ended the studies this released association sent that no other association,
    in any listener process, is still sending (`transfers.end`); an association that had a
    store refused ended nothing, as an aborted one did not."""
    key = event.assoc.__dict__.get("dicomai_transfer")
    if key is None:
        return
    if event.assoc.__dict__.get("dicomai_refused"):
        _forget(sessions, key)
        return
    try:
        transfers.end(sessions, key, stale_after)
    except Exception as exc:  # the quiet period still completes these studies
        log.error("could not record association end: %s", type(exc).__name__)
        _forget(sessions, key)


def on_connection_close(event: evt.Event, sessions: sessionmaker[Session]) -> None:
    OPEN_ASSOCIATIONS.dec()
    state = event.assoc.__dict__
    key = state.get("dicomai_transfer")
    # A released association's studies are EVT_RELEASED's, which may run after this: the
    # peer closes the connection as soon as it has the release's answer.
    if key is None or state.get("dicomai_releasing") or event.assoc.is_released:
        return
    # Aborted, or the connection dropped: its studies are left to the quiet period.
    _forget(sessions, key)


def _forget(sessions: sessionmaker[Session], key: str) -> None:
    try:
        transfers.forget(sessions, key)
    except Exception as exc:  # left, the rows count for the maximum wait at most
        log.error("could not forget an association's transfers: %s", type(exc).__name__)


def on_connection_open(
    event: evt.Event,
    limits: Limits,
    sessions: sessionmaker[Session],
    policy: AccessPolicy,
    pending_limit: int = PENDING_PER_ADDRESS,
) -> None:
    OPEN_ASSOCIATIONS.inc()
    set_nodelay(event)
    bound_reads(event, limits, sessions)
    guard_protocol(event, sessions, policy)
    if _pending_from(event.assoc) >= pending_limit:
        log.warning(
            "connection from %s closed: more than %d of its connections wait for an association",
            event.assoc.requestor.address,
            pending_limit,
        )
        drop_connection(event.assoc)


def _pending_from(assoc: Any) -> int:
    """Other connections from `assoc`'s address not yet an association (`assoc`'s thread is
    not started when its connection opens, so it is not among them)."""
    address = assoc.requestor.address
    return sum(
        1
        for other in assoc.ae.active_associations
        if other is not assoc
        and other.is_acceptor
        and not (other.is_established or other.is_released or other.is_aborted)
        and not other.is_rejected
        and other.requestor.address == address
    )


# Counting the associations and admitting one is one step: requests that arrived together
# each counted the others as not yet established, and all were let in past the limit.
_ADMISSION = threading.Lock()


def _admitted(assoc: Any, max_associations: int) -> bool:
    """Whether `assoc` fits under the limit, counted with those admitted and not yet
    established; if so it is counted from now on."""
    with _ADMISSION:
        taken = sum(
            1
            for other in assoc.ae.active_associations
            if other is not assoc
            and other.is_acceptor
            and (other.is_established or other.__dict__.get("dicomai_admitted"))
        )
        if taken >= max_associations:
            return False
        assoc.__dict__["dicomai_admitted"] = True
        return True


def on_requested(
    event: evt.Event,
    policy: AccessPolicy,
    our_title: str,
    sessions: sessionmaker[Session],
    max_associations: int | None = None,
) -> None:
    """Reject a caller not on the allow-list, or calling another AE (PS3.8 Table 9-21), and
    one past `max_associations` associations (local limit exceeded)."""
    requestor = event.assoc.requestor
    primitive = cast(A_ASSOCIATE, requestor.primitive)
    calling = primitive.calling_ae_title
    called = primitive.called_ae_title.strip()
    decision = policy.check(calling, requestor.address)
    diagnostic = 0x03  # calling AE title not recognised
    malformed = bad_titles(event.assoc)
    if malformed is not None:
        reason, diagnostic, calling = malformed
        decision = Decision(False, reason)
    if not decision.allowed and is_health_probe(
        calling,
        requestor.address,
        [str(c.abstract_syntax) for c in primitive.presentation_context_definition_list],
    ):
        decision = Decision(True, "health probe")
        # Let in for C-ECHO alone: the Storer refuses anything such an association sends.
        event.assoc.__dict__["dicomai_health_probe"] = True
    if decision.allowed and called != our_title:
        decision, diagnostic = Decision(False, "called AE title is not ours"), 0x07
    result, source = 0x01, 0x01  # rejected-permanent, by the service-user
    limited = decision.allowed and max_associations is not None
    if limited and not _admitted(event.assoc, max_associations or 0):
        decision = Decision(False, "association limit reached")
        # PS3.8 Table 9-21: rejected-transient, service-provider (presentation), local limit
        # exceeded, as pynetdicom answered it.
        result, source, diagnostic = 0x02, 0x03, 0x02
    if decision.allowed:
        return
    # Audited before the peer hears of it, so the row exists once the rejection is seen.
    _rejected(sessions, calling, requestor.address, decision.reason)
    event.assoc.__dict__["dicomai_rejected"] = True
    event.assoc.acse.send_reject(result, source, diagnostic)
    # As pynetdicom's own rejections do: wait for the DUL to send the A-ASSOCIATE-RJ,
    # otherwise the socket may close first and the peer sees an abort.
    event.assoc.kill()


def on_rejected(event: evt.Event, sessions: sessionmaker[Session]) -> None:
    """pynetdicom's own rejections: past `max_associations` (local limit exceeded)."""
    if event.assoc.__dict__.get("dicomai_rejected"):
        return
    requestor = event.assoc.requestor
    _rejected(sessions, requestor.ae_title, requestor.address, "association limit reached")


def on_refused_connection(sessions: sessionmaker[Session]) -> Callable[[str, str], None]:
    """For the server: audit a connection refused before any association (TLS handshake)."""

    def refused(address: str, reason: str) -> None:
        _rejected(sessions, "unknown", address, reason, logged=True)

    return refused


def _rejected(
    sessions: sessionmaker[Session], calling: str, address: str, reason: str, logged: bool = False
) -> None:
    if not logged:
        log.warning("association rejected: %s (%s from %s)", reason, calling, address)
    audit_refusal(sessions, Action.ASSOCIATION_REJECTED, calling, address, reason)


def on_echo(event: evt.Event) -> int:
    return 0x0000
