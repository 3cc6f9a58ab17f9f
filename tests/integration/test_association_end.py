"""`complete_on_association_end`: which association ends close a study, with the real listener."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from daemon import Listener
from pynetdicom import AE
from pynetdicom.association import Association
from servers import sample_file, wait_for

AET = "DICOMAI"
SENDERS = ("SENDERA", "SENDERB", "SENDERC")
STUDY = "1.2.826.0.1.3680043.8.498.4100"
OTHER_STUDY = "1.2.826.0.1.3680043.8.498.4200"


@pytest.fixture
def listener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Listener]:
    peers = [{"ae_title": title, "hosts": ["127.0.0.1"]} for title in SENDERS]
    # No quiet period or maximum wait in reach: only an association end closes a study here.
    with Listener(
        tmp_path / "listener",
        AET,
        peers,
        complete_on_association_end=True,
        study_quiet_seconds=3600,
        study_max_wait_seconds=3600,
        listener_processes=getattr(request, "param", 1),
    ) as daemon:
        yield daemon


def image(study: str, number: int) -> pydicom.Dataset:
    ds = pydicom.dcmread(sample_file("CT_small.dcm"))
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = f"{study}.1"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"{study}.1.{number}"
    return ds


def associate(listener: Listener, title: str) -> Association:
    ae = AE(ae_title=title)
    ds = image(STUDY, 0)
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", listener.port, ae_title=AET)
    assert assoc.is_established
    return assoc


def send(assoc: Association, study: str, *numbers: int) -> None:
    for number in numbers:
        assert assoc.send_c_store(image(study, number)).Status == 0x0000


def state(listener: Listener, study: str) -> tuple[str, int]:
    rows = listener.query(
        "SELECT state, instance_count FROM studies WHERE study_uid = :uid", uid=study
    )
    return rows[0] if rows else ("absent", 0)


def closes(listener: Listener, study: str) -> list[int]:
    """The instance counts at which `study` was closed, in order."""
    rows = listener.query(
        "SELECT detail FROM audit_events WHERE action = 'study.completed' "
        "AND study_uid = :uid ORDER BY id",
        uid=study,
    )
    return [(json.loads(d) if isinstance(d, str) else d)["instances"] for (d,) in rows]


def closed(listener: Listener, study: str, when: str) -> None:
    """Wait until `study` is complete; `when` names the event that should close it."""
    wait_for(
        lambda: state(listener, study)[0] == "complete",
        60,
        f"the study to close {when}",
        details=listener.log,
    )


def another_study_closed_at_its_release(listener: Listener) -> None:
    """Send one image of another study and release: once that study is closed, the listener
    has handled the association ends before it, and the assembly loop has looked at them."""
    assoc = associate(listener, "SENDERC")
    send(assoc, OTHER_STUDY, 1)
    assoc.release()
    closed(listener, OTHER_STUDY, "at its release")


def test_an_aborted_association_leaves_its_study_open_for_the_senders_retry(
    listener: Listener,
) -> None:
    # The sender aborts after 2 of 4 images and sends all 4 again: closed at the abort, a
    # report on 2 images went out before the retry, and another on 4 after it.
    first = associate(listener, "SENDERA")
    send(first, STUDY, 1, 2)
    first.abort()
    another_study_closed_at_its_release(listener)
    assert state(listener, STUDY) == ("receiving", 2), "the A-ABORT closed the study"

    retry = associate(listener, "SENDERA")
    send(retry, STUDY, 1, 2, 3, 4)
    retry.release()
    closed(listener, STUDY, "at the retry's release")
    assert closes(listener, STUDY) == [4]


def test_a_released_association_that_had_a_store_refused_leaves_its_study_open(
    listener: Listener,
) -> None:
    # 2 of 3 images stored, the third refused, then a normal release (storescu releases
    # after 0xA700 below the disk watermark): the release closed the study on 2 images.
    first = associate(listener, "SENDERA")
    send(first, STUDY, 1, 2)
    refused = image(STUDY, 3)
    refused.SeriesInstanceUID = "1.2.abc"  # not a UID
    assert first.send_c_store(refused).Status == 0xC000
    first.release()
    another_study_closed_at_its_release(listener)
    assert state(listener, STUDY) == ("receiving", 2), "the release closed a failed transfer"

    retry = associate(listener, "SENDERA")
    send(retry, STUDY, 1, 2, 3)
    retry.release()
    closed(listener, STUDY, "at the retry's release")
    assert closes(listener, STUDY) == [3]


# Two listener processes: a busy one lets the other take the next connection
# (`dicomai.ingest.server`), so the two associations are held by different processes.
@pytest.mark.parametrize("listener", [1, 2], indirect=True, ids=["one_process", "two_processes"])
def test_a_study_sent_on_two_associations_closes_when_the_last_of_them_releases(
    listener: Listener,
) -> None:
    # Sender B is sending the study when sender A sends two images of it and releases:
    # closed at A's release, B's later images gave it a second report.
    slow = associate(listener, "SENDERB")
    send(slow, STUDY, 1)
    fast = associate(listener, "SENDERA")
    send(fast, STUDY, 2, 3)
    fast.release()
    another_study_closed_at_its_release(listener)
    assert state(listener, STUDY) == ("receiving", 3), "closed while sender B still sends it"

    send(slow, STUDY, 4)
    slow.release()
    closed(listener, STUDY, "at the last release")
    assert closes(listener, STUDY) == [4]


# Two listener processes: a busy one lets the other take the next connection
# (`dicomai.ingest.server`), so the two associations are held by different processes.
@pytest.mark.parametrize("listener", [1, 2], indirect=True, ids=["one_process", "two_processes"])
def test_a_study_whose_other_sender_aborts_is_left_to_the_quiet_period(
    listener: Listener,
) -> None:
    # A released while B still sent the study, then B aborted: neither end may close it.
    slow = associate(listener, "SENDERB")
    send(slow, STUDY, 1)
    fast = associate(listener, "SENDERA")
    send(fast, STUDY, 2)
    fast.release()
    slow.abort()
    another_study_closed_at_its_release(listener)
    assert state(listener, STUDY) == ("receiving", 2)
