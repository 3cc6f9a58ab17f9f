"""Health checks of a running installation: database, models, broker, spool space, workers,
deliveries, DICOM listener."""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING

from dicomai.config import Settings

if TYPE_CHECKING:
    from sqlalchemy.orm import Session


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


def check_database(settings: Settings) -> Check:
    from dicomai.db.migrate import current_revision, head_revision
    from dicomai.db.session import make_engine

    engine = make_engine(settings.database_url, create=False)
    try:
        current, head = current_revision(engine), head_revision(settings.database_url)
    finally:
        engine.dispose()
    if current != head:
        return Check(
            "database", False, f"schema {current}, newest {head}: run `dicomai db upgrade`"
        )
    return Check("database", True, f"schema {current}")


def reporting_versions(session: Session) -> list[str]:
    """The model versions that send results ("NAME VERSION (state)"): active and canary ones.
    A shadow version runs but sends nothing, so it does not count."""
    from sqlalchemy import select

    from dicomai.db.models import ModelState, ModelVersion

    rows = session.scalars(
        select(ModelVersion)
        .where(ModelVersion.state.in_((ModelState.ACTIVE, ModelState.CANARY)))
        .order_by(ModelVersion.name, ModelVersion.version)
    ).all()
    return [f"{row.label} ({row.state.value})" for row in rows]


# What `health` and `serve` say when no version sends results.
NO_MODEL = (
    "no model version active or canary: every study is stored and analysed by none "
    "(`dicomai models register PACKAGE`, then `dicomai models activate NAME VERSION`)"
)


def check_models(settings: Settings) -> Check:
    """A model version that sends results: without one every study is stored, marked
    complete and analysed by nothing, which no other check notices."""
    from dicomai.db.session import make_engine, make_sessionmaker

    engine = make_engine(settings.database_url, create=False)
    try:
        with make_sessionmaker(engine)() as session:
            versions = reporting_versions(session)
    finally:
        engine.dispose()
    if not versions:
        return Check("models", False, NO_MODEL)
    return Check("models", True, ", ".join(versions))


def check_broker(settings: Settings) -> Check:
    if not settings.embedded_broker:
        import redis

        # Timeouts on every read: kombu's connection check bounds the connect only.
        redis.Redis.from_url(settings.broker_url, socket_timeout=5, socket_connect_timeout=5).ping()
        return Check("broker", True, "reachable")
    # The folder queue, looked at and not created: health run by root before the service
    # ever started left root-owned folders the service user could not write.
    queue = settings.broker_dir / "queue"
    if not queue.is_dir():
        return Check("broker", False, f"{queue} does not exist (`dicomai serve` creates it)")
    if not os.access(queue, os.W_OK | os.X_OK):
        return Check("broker", False, f"{queue} is not writable by this user")
    return Check("broker", True, "embedded folder queue")


def check_spool(settings: Settings) -> Check:
    from dicomai.ingest.spool import Spool

    if not settings.spool_dir.is_dir():
        return Check(
            "spool", False, f"{settings.spool_dir} does not exist (`dicomai serve` creates it)"
        )
    free = Spool(settings.spool_dir).free_bytes()
    floor = settings.storage.min_free_mb * 1024 * 1024
    detail = f"{free // (1024 * 1024)} MiB free, watermark {settings.storage.min_free_mb} MiB"
    return Check("spool", free >= floor, detail)


def check_worker(settings: Settings) -> Check:
    """Jobs left queued past the queued lease: no worker takes them (none runs, or it keeps
    failing to start: a GPU it cannot open, a model it cannot load; see the worker's log)."""
    from sqlalchemy import func, select

    from dicomai.db.models import Job, JobState, utcnow
    from dicomai.db.session import make_engine, make_sessionmaker

    lease = settings.worker.queued_lease_seconds
    since = utcnow() - timedelta(seconds=lease)
    engine = make_engine(settings.database_url, create=False)
    try:
        with make_sessionmaker(engine)() as session:
            waiting = session.scalar(
                select(func.count())
                .select_from(Job)
                .where(Job.state == JobState.QUEUED, Job.created_at < since)
            )
            # A backlog that workers are working through is not a failure: some job started,
            # beat its heartbeat or finished within the lease.
            working = session.scalar(
                select(func.count())
                .select_from(Job)
                .where(
                    (Job.started_at >= since)
                    | (Job.heartbeat_at >= since)
                    | (Job.finished_at >= since)
                )
            )
    finally:
        engine.dispose()
    if waiting and not working:
        return Check(
            "worker",
            False,
            f"{waiting} jobs queued for over {lease:g} s and none started: is a worker running?",
        )
    if waiting:
        return Check("worker", True, f"{waiting} jobs queued for over {lease:g} s; workers busy")
    return Check("worker", True, f"no job queued for over {lease:g} s")


# Failed attempts after which a delivery still pending makes `health` fail.
RETRYING_ATTEMPTS = 3


def check_deliveries(settings: Settings) -> Check:
    """Results that gave up on reaching their destination in the last day (older failures
    are left to `dicomai deliveries list --state failed`: a health check must be able to
    turn green again without a resend)."""
    from sqlalchemy import func, select

    from dicomai.audit import Action
    from dicomai.db.models import AuditEvent, Delivery, DeliveryState, utcnow
    from dicomai.db.session import make_engine, make_sessionmaker

    since = utcnow() - timedelta(days=1)
    engine = make_engine(settings.database_url, create=False)
    try:
        with make_sessionmaker(engine)() as session:
            recent = session.scalars(
                select(AuditEvent.object_id).where(
                    AuditEvent.action == Action.DELIVERY_FAILED.value, AuditEvent.at >= since
                )
            ).all()
            ids = {int(i) for i in recent if i is not None and i.isdigit()}
            failed = session.scalar(
                select(func.count())
                .select_from(Delivery)
                .where(Delivery.state == DeliveryState.FAILED, Delivery.id.in_(ids))
            )
            retrying = session.scalar(
                select(func.count())
                .select_from(Delivery)
                .where(
                    Delivery.state == DeliveryState.PENDING,
                    Delivery.attempts >= RETRYING_ATTEMPTS,
                )
            )
    finally:
        engine.dispose()
    if failed:
        return Check(
            "deliveries",
            False,
            f"{failed} failed in the last 24 h: `dicomai deliveries list --state failed`, "
            "then `dicomai deliveries retry --failed`",
        )
    if retrying:
        # With the default backoff a delivery is given up only after about 11 hours: a PACS
        # that is down must show here long before that.
        return Check(
            "deliveries",
            False,
            f"{retrying} still pending after {RETRYING_ATTEMPTS} or more failed attempts (is a "
            "destination down?): `dicomai deliveries list --state pending`; once it is back, "
            "`dicomai deliveries retry ID...` sends them now",
        )
    return Check("deliveries", True, "none failed in the last 24 h")


def check_listener(settings: Settings) -> Check:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    host = "127.0.0.1" if settings.ingest.host in ("0.0.0.0", "") else settings.ingest.host
    from dicomai.ingest.access import HEALTH_AE_TITLE
    from dicomai.ingest.tls import probe_context

    # pynetdicom logs a refused connection as an error; the check's own line says it.
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    ae = AE(ae_title=HEALTH_AE_TITLE)
    # connection_timeout covers the TLS handshake, which otherwise waits for ever.
    ae.acse_timeout = ae.network_timeout = ae.dimse_timeout = ae.connection_timeout = 5
    ae.add_requested_context(Verification)
    # The listener speaks TLS only when it has a certificate: the probe must as well.
    context = probe_context(settings.ingest.tls)
    over = " over TLS" if context else ""
    try:
        assoc = ae.associate(
            host,
            settings.ingest.port,
            ae_title=settings.ingest.ae_title,
            tls_args=(context, host) if context else None,
        )
    except socket.gaierror as exc:
        return Check("listener", False, f"[ingest] host {host!r}: {exc.strerror or exc}")
    if assoc.is_established:
        status = assoc.send_c_echo()
        assoc.release()
        return Check("listener", bool(status) and status.Status == 0, f"C-ECHO answered{over}")
    if assoc.is_rejected:
        # The listener answered but refused the probe: it is not on this machine's loopback
        # (ingest.host is another interface) or is an older version.
        return Check("listener", True, "answering, but it rejected the health probe")
    hint = ""
    if context and settings.ingest.tls.require_client_cert:
        hint = " (the probe presents the listener's certificate as its client certificate)"
    return Check("listener", False, f"no answer on {host}:{settings.ingest.port}{over}{hint}")


CHECKS: tuple[Callable[[Settings], Check], ...] = (
    check_database,
    check_models,
    check_broker,
    check_spool,
    check_worker,
    check_deliveries,
    check_listener,
)


_READ_THE_DATABASE = (check_models, check_worker, check_deliveries)

# A server that accepts connections but does not answer (stopped, swapping, a full disk)
# must not hang the check that monitoring runs: each check gets this long.
CHECK_SECONDS = 20.0


def run_checks(settings: Settings, seconds: float = CHECK_SECONDS) -> list[Check]:
    """Run every check; a check that raises is reported as failed with the error's type, one
    that does not finish within `seconds` as not answering."""
    results: list[Check] = []
    for check in CHECKS:
        database = results[0] if results else None
        if check in _READ_THE_DATABASE and database is not None and not database.ok:
            # Their own error would be the database's again, in SQL terms.
            name = check.__name__.removeprefix("check_")
            results.append(Check(name, False, "not checked: the database check failed"))
            continue
        results.append(_bounded(check, settings, seconds))
    return results


def _bounded(check: Callable[[Settings], Check], settings: Settings, seconds: float) -> Check:
    name = check.__name__.removeprefix("check_")
    outcome: list[Check] = []

    def run() -> None:
        try:
            outcome.append(check(settings))
        except Exception as exc:  # each check's failure is a result, not a crash
            outcome.append(Check(name, False, f"{type(exc).__name__}: {exc}".splitlines()[0]))

    # A daemon thread: one stuck in a read that never returns does not keep the process.
    thread = threading.Thread(target=run, name=f"health-{name}", daemon=True)
    thread.start()
    thread.join(seconds)
    return outcome[0] if outcome else Check(name, False, f"no answer within {seconds:g} s")
