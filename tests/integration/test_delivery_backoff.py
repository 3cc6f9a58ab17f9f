"""Delivery retries against a PACS that refuses: one attempt at a time, each after its backoff."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import pydicom
import pytest
from daemon import REPO
from pynetdicom import AE, AllStoragePresentationContexts, evt
from recording import record_dataset
from servers import dropping_port, free_port, wait_for
from sqlalchemy import select

from dicomai.audit import Operator, os_user
from dicomai.config import load_settings
from dicomai.db.models import AuditEvent, Delivery, DeliveryState, OutputObject
from dicomai.db.session import make_engine, make_sessionmaker
from dicomai.delivery import dispatch
from dicomai.delivery.dispatch import attempt_deliveries, attempt_delivery
from dicomai.delivery.policy import backoff_seconds
from dicomai.ingest.spool import Spool
from dicomai.jobs.assembler import complete_quiet_studies
from dicomai.jobs.reconciler import Leases, ring_deliveries
from dicomai.jobs.runner import JobRunner
from dicomai.rollout.deployment import activate
from dicomai.rollout.registry import register
from dicomai.training.synthetic import write_dicom_images


class TaskDoorbell:
    """Records each ring; `deliver` then runs the rung tasks as a Celery worker would."""

    def __init__(self, settings, sessions) -> None:
        self.settings, self.sessions = settings, sessions
        self.rung: list[int] = []

    def ring_job(self, job_id: int) -> None:
        raise AssertionError("no job is rung here")

    def ring_delivery(self, delivery_id: int) -> None:
        self.rung.append(delivery_id)

    def deliver(self, times: int = 1) -> None:
        rung, self.rung = self.rung, []
        for delivery_id in rung * times:
            attempt_delivery(self.sessions, self.settings, delivery_id)


@pytest.fixture
def refused(database_url: str, tmp_path: Path):
    """A finished job's outputs, each with a new delivery to a PACS nobody listens for
    (max_attempts 2, backoff 1 s): (settings, sessions, delivery ids)."""
    options = {"storage": {"dir": tmp_path / "var"}, "database": {"url": database_url}}
    quiet = load_settings(None, **options)
    sessions = make_sessionmaker(make_engine(database_url))
    with sessions() as session, session.begin():
        operator = Operator(os_user(), "test")
        register(session, REPO / "models" / "demo-chest-nodule", quiet.registry_dir, operator)
        activate(session, "demo-chest-nodule", "1.0.0", operator)
    (image,) = write_dicom_images(tmp_path / "synthetic", 1, seed=3, size=256)
    record_dataset(Spool(quiet.spool_dir), sessions, pydicom.dcmread(image.path))
    (job_id,) = complete_quiet_studies(sessions, 0)
    JobRunner(quiet, sessions, device="cpu").run_job(job_id)
    pacs = {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": free_port()}
    settings = load_settings(
        None,
        **options,
        delivery={"backoff_initial_seconds": 1, "max_attempts": 2, "timeout_seconds": 5},
        destinations=[pacs],
    )
    # As the worker adds them when it writes an object: pending and due at once.
    with sessions() as session, session.begin():
        outputs = session.scalars(select(OutputObject).where(OutputObject.job_id == job_id))
        deliveries = [Delivery(output_id=o.id, destination="pacs") for o in outputs]
        session.add_all(deliveries)
    assert deliveries, "the job wrote no output to deliver"
    return settings, sessions, sorted(d.id for d in deliveries)


def attempts_of(sessions, ids: list[int]) -> dict[int, tuple[int, DeliveryState]]:
    with sessions() as session:
        rows = session.scalars(select(Delivery).where(Delivery.id.in_(ids)))
        return {d.id: (d.attempts, d.state) for d in rows}


def outcome_times(sessions, delivery_id: int) -> list[tuple[int, object]]:
    """(attempts, when) of each recorded attempt of a delivery, oldest first."""
    with sessions() as session:
        rows = session.scalars(
            select(AuditEvent)
            .where(
                AuditEvent.object_type == "delivery",
                AuditEvent.object_id == str(delivery_id),
                AuditEvent.action.in_(["delivery.retry", "delivery.failed", "delivery.sent"]),
            )
            .order_by(AuditEvent.id)
        )
        return [(row.detail["attempts"], row.at) for row in rows]


def test_a_delivery_rung_while_the_worker_sends_it_waits_for_its_backoff(refused) -> None:
    settings, sessions, ids = refused
    doorbell = TaskDoorbell(settings, sessions)
    leases = Leases.from_settings(settings.worker)

    # The reconciler rings the new deliveries while the worker sends them itself.
    assert ring_deliveries(sessions, doorbell, leases) == len(ids)
    attempt_deliveries(sessions, settings, ids)
    doorbell.deliver(times=2)  # Celery may deliver a task twice

    assert attempts_of(sessions, ids) == {i: (1, DeliveryState.PENDING) for i in ids}, (
        "a delivery was attempted again before its backoff had passed"
    )
    # Its backoff over, it is rung again at once, not a delivery lease (120 s) after the ring
    # that the worker's own attempt answered.
    deadline = time.monotonic() + 20
    while any(n < 2 for n, _ in attempts_of(sessions, ids).values()):
        assert time.monotonic() < deadline, f"no second attempt: {attempts_of(sessions, ids)}"
        ring_deliveries(sessions, doorbell, leases)
        doorbell.deliver()
        time.sleep(0.05)


def test_retries_wait_for_the_backoff_and_stop_at_max_attempts(refused) -> None:
    settings, sessions, ids = refused
    doorbell = TaskDoorbell(settings, sessions)
    leases = Leases.from_settings(settings.worker)
    attempt_deliveries(sessions, settings, ids)
    attempt_deliveries(sessions, settings, ids)  # a redelivered task of the worker's job
    assert attempts_of(sessions, ids) == {i: (1, DeliveryState.PENDING) for i in ids}

    deadline = time.monotonic() + 30
    while any(s != DeliveryState.FAILED for _, s in attempts_of(sessions, ids).values()):
        assert time.monotonic() < deadline, f"deliveries not failed: {attempts_of(sessions, ids)}"
        ring_deliveries(sessions, doorbell, leases)
        doorbell.deliver(times=2)
        time.sleep(0.05)

    ring_deliveries(sessions, doorbell, leases)
    doorbell.deliver()
    for delivery_id in ids:
        attempt_delivery(sessions, settings, delivery_id)
    assert attempts_of(sessions, ids) == {i: (2, DeliveryState.FAILED) for i in ids}
    backoff = timedelta(seconds=backoff_seconds(1, settings.delivery))
    for delivery_id in ids:
        (first, first_at), (second, second_at) = outcome_times(sessions, delivery_id)
        assert (first, second) == (1, 2)
        assert second_at - first_at >= backoff, (
            f"delivery {delivery_id} attempted again {second_at - first_at} after a failure "
            f"whose backoff is {backoff}"
        )


def test_a_send_that_raises_is_a_failed_attempt_not_a_lost_one(refused, monkeypatch) -> None:
    settings, sessions, ids = refused

    def dropped(*_args: object) -> None:
        # What pynetdicom raised when the PACS went away between two C-STOREs.
        raise RuntimeError("The association with a peer SCP must be established")

    monkeypatch.setattr("dicomai.delivery.dispatch.send_to", dropped)
    assert attempt_deliveries(sessions, settings, ids) == 0
    assert attempts_of(sessions, ids) == {i: (1, DeliveryState.PENDING) for i in ids}
    with sessions() as session:
        errors = {
            d.last_error for d in session.scalars(select(Delivery).where(Delivery.id.in_(ids)))
        }
    assert errors == {"sending failed: RuntimeError"}
    time.sleep(1.2)  # the backoff, then the last of max_attempts
    attempt_deliveries(sessions, settings, ids)
    assert attempts_of(sessions, ids) == {i: (2, DeliveryState.FAILED) for i in ids}


def _with(settings, **sections):
    """`settings` with some sections' values replaced."""
    update = {}
    for name, values in sections.items():
        current = getattr(settings, name)
        update[name] = values if isinstance(values, list) else current.model_copy(update=values)
    return settings.model_copy(update=update)


@contextmanager
def storing_pacs(port: int, seconds_per_object: float = 0.0):
    """A PACS (pynetdicom) on `port` that takes `seconds_per_object` to store each object;
    yields the SOP Instance UIDs it stored and an event set when its first store began."""
    stored: list[str] = []
    began = threading.Event()

    def on_store(event: evt.Event) -> int:
        began.set()
        time.sleep(seconds_per_object)
        stored.append(event.request.AffectedSOPInstanceUID)
        return 0x0000

    ae = AE(ae_title="PACS")
    ae.supported_contexts = AllStoragePresentationContexts
    server = ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    try:
        yield stored, began
    finally:
        server.shutdown()


def test_a_pacs_slower_than_the_lease_gets_each_object_once(refused) -> None:
    # Two workers: one sends, the other is rung for the same deliveries meanwhile. The claim
    # was renewed only before the association, so a PACS taking longer than the lease for
    # the lot was sent everything again by the second.
    settings, sessions, ids = refused
    assert len(ids) >= 2, "the job needs two objects to outlast the lease"
    settings = _with(settings, worker={"delivery_lease_seconds": 2.0})
    with storing_pacs(settings.destinations[0].port, seconds_per_object=1.2) as (stored, began):
        first = threading.Thread(target=attempt_deliveries, args=(sessions, settings, ids))
        first.start()
        assert began.wait(30), "the first worker sent nothing"
        while first.is_alive():
            attempt_deliveries(sessions, settings, ids)
            time.sleep(0.1)
        first.join()
    assert sorted(stored) == sorted(set(stored)), f"objects stored twice: {stored}"
    assert attempts_of(sessions, ids) == {i: (1, DeliveryState.SENT) for i in ids}


def test_a_destination_that_does_not_answer_does_not_hold_back_another(refused) -> None:
    settings, sessions, ids = refused
    with dropping_port() as silent:
        (pacs,) = settings.destinations
        live = pacs.model_copy(update={"name": "live", "port": free_port()})
        with storing_pacs(live.port) as (stored, _):
            settings = _with(
                settings,
                destinations=[pacs.model_copy(update={"port": silent}), live],
                delivery={"timeout_seconds": 10},
            )
            with sessions() as session, session.begin():
                outputs = session.scalars(
                    select(Delivery.output_id).where(Delivery.id.in_(ids))
                ).all()
                added = [Delivery(output_id=o, destination="live") for o in outputs]
                session.add_all(added)
            live_ids = sorted(d.id for d in added)
            sender = threading.Thread(
                target=attempt_deliveries, args=(sessions, settings, ids + live_ids)
            )
            sender.start()
            wait_for(lambda: len(stored) == len(live_ids), 60, "the live PACS to store")
            # Sent while the silent destination's attempt still waits for its connection.
            assert attempts_of(sessions, ids) == {i: (0, DeliveryState.PENDING) for i in ids}
            sender.join()
    assert attempts_of(sessions, live_ids) == {i: (1, DeliveryState.SENT) for i in live_ids}
    assert attempts_of(sessions, ids) == {i: (1, DeliveryState.PENDING) for i in ids}


def test_an_attempt_that_outlived_its_lease_records_nothing_over_the_next(
    refused, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Attempt A's PACS hangs past the lease; attempt B takes the delivery and is still
    # sending when A gives up. A's failure, at max_attempts, marked the delivery failed, and
    # B's success was then dropped: an object in the PACS, "failed" in dicomai.
    settings, sessions, ids = refused
    settings.delivery.max_attempts = 1
    first = ids[:1]
    b_sending, b_may_finish = threading.Event(), threading.Event()
    calls = []

    def send_to(destination, paths, settings, on_sent=None):
        calls.append(len(calls))
        if len(calls) == 1:  # A: its lease lapses, B claims and starts sending
            with sessions() as session, session.begin():
                delivery = session.get_one(Delivery, first[0])
                delivery.next_attempt_at = delivery.next_attempt_at - timedelta(hours=1)
            b.start()
            assert b_sending.wait(30)
            return ["association timed out"] * len(paths)
        b_sending.set()
        assert b_may_finish.wait(30)
        return [None] * len(paths)

    monkeypatch.setattr(dispatch, "send_to", send_to)
    b = threading.Thread(target=attempt_deliveries, args=(sessions, settings, first))
    assert attempt_deliveries(sessions, settings, first) == 0
    assert attempts_of(sessions, first) == {first[0]: (0, DeliveryState.PENDING)}
    b_may_finish.set()
    b.join(30)
    assert attempts_of(sessions, first) == {first[0]: (1, DeliveryState.SENT)}
