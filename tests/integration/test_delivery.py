"""Delivery to a PACS: one association for many objects, each object's own outcome."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE, evt
from servers import dropping_port, free_port, sample_file

from dicomai.config import DeliverySettings
from dicomai.delivery.policy import backoff_seconds, gives_up
from dicomai.delivery.scu import send_files

CT = "1.2.840.10008.5.1.4.1.1.2"


@pytest.fixture
def ct_only_pacs():
    """A PACS (pynetdicom SCP) that takes CT images only and counts what it stored."""
    received: list[str] = []

    def on_store(event: evt.Event) -> int:
        received.append(event.request.AffectedSOPInstanceUID)
        return 0x0000

    ae = AE(ae_title="PACS")
    ae.add_supported_context(CT, [ExplicitVRLittleEndian, "1.2.840.10008.1.2"])
    port = free_port()
    server = ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    yield port, received
    server.shutdown()


def test_each_object_gets_its_outcome_over_one_association(ct_only_pacs, tmp_path: Path) -> None:
    port, received = ct_only_pacs
    ct = tmp_path / "ct.dcm"
    pydicom.dcmread(sample_file("CT_small.dcm")).save_as(ct, enforce_file_format=True)
    mr = tmp_path / "mr.dcm"
    pydicom.dcmread(sample_file("MR_small.dcm")).save_as(mr, enforce_file_format=True)

    outcomes = send_files(
        [ct, mr], ae_title="PACS", host="127.0.0.1", port=port, calling_ae="DICOMAI", timeout=10
    )

    assert outcomes[0] is None
    assert outcomes[1] is not None and "no presentation context" in str(outcomes[1])
    assert received == [pydicom.dcmread(ct).SOPInstanceUID]


def test_unreachable_pacs_fails_every_object(tmp_path: Path) -> None:
    ct = tmp_path / "ct.dcm"
    pydicom.dcmread(sample_file("CT_small.dcm")).save_as(ct, enforce_file_format=True)
    outcomes = send_files(
        [ct, ct],
        ae_title="PACS",
        host="127.0.0.1",
        port=free_port(),
        calling_ae="DICOMAI",
        timeout=5,
    )
    assert all(o is not None and "no connection to PACS@127.0.0.1" in str(o) for o in outcomes)


@pytest.fixture
def ct_file(tmp_path: Path) -> Path:
    ct = tmp_path / "ct.dcm"
    pydicom.dcmread(sample_file("CT_small.dcm")).save_as(ct, enforce_file_format=True)
    return ct


@pytest.fixture
def silent_port():
    with dropping_port() as port:
        yield port


def test_a_pacs_that_drops_the_connection_request_fails_within_the_timeout(
    ct_file: Path, silent_port: int
) -> None:
    # pynetdicom's connect has no timeout of its own: the kernel gave up after 130 s.
    outcome: list[object] = []
    sender = threading.Thread(
        target=lambda: outcome.extend(
            send_files(
                [ct_file],
                ae_title="PACS",
                host="127.0.0.1",
                port=silent_port,
                calling_ae="DICOMAI",
                timeout=2,
            )
        )
    )
    sender.start()
    sender.join(60)
    assert not sender.is_alive(), "the connection attempt outlived the delivery timeout"
    assert "no connection to PACS@" in str(outcome[0])


@contextmanager
def scp(status: int = 0x0000, require_called_aet: bool = False) -> Iterator[int]:
    """A CT storage SCP (pynetdicom) answering every C-STORE with `status`; yields its port."""
    ae = AE(ae_title="PACS")
    ae.require_called_aet = require_called_aet
    ae.add_supported_context(CT, ExplicitVRLittleEndian)
    port = free_port()
    server = ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, lambda _: status)]
    )
    try:
        yield port
    finally:
        server.shutdown()


def send(paths: list[Path], port: int, ae_title: str = "PACS") -> list[object]:
    return list(
        send_files(
            paths, ae_title=ae_title, host="127.0.0.1", port=port, calling_ae="DICOMAI", timeout=10
        )
    )


def test_a_rejected_association_says_why(ct_file: Path) -> None:
    with scp(require_called_aet=True) as port:
        (outcome,) = send([ct_file], port, ae_title="ARCHIVE")
    assert "rejected the association" in str(outcome)
    assert "Called AE title not recognised" in str(outcome)


def test_a_pacs_that_accepts_no_context_is_named_with_what_was_offered(ct_only_pacs, tmp_path):
    port, received = ct_only_pacs
    mr = tmp_path / "mr.dcm"
    pydicom.dcmread(sample_file("MR_small.dcm")).save_as(mr, enforce_file_format=True)
    (outcome,) = send([mr], port)
    assert "accepted none of the presentation contexts offered" in str(outcome)
    assert "MR Image Storage in Explicit VR Little Endian" in str(outcome)
    assert received == []


@pytest.mark.parametrize("status", [0x0001, 0x0107, 0x0116, 0xB000])
def test_a_warning_status_means_stored(ct_file: Path, status: int) -> None:
    # PS3.7 C: the object is stored; counted failed, it was sent again and again.
    with scp(status) as port:
        assert send([ct_file], port) == [None]


def test_backoff_doubles_up_to_its_ceiling_and_gives_up_after_max_attempts() -> None:
    settings = DeliverySettings(max_attempts=5, backoff_initial_seconds=5, backoff_max_seconds=30)
    assert [backoff_seconds(n, settings) for n in range(1, 6)] == [5, 10, 20, 30, 30]
    assert not gives_up(4, settings)
    assert gives_up(5, settings)
