"""An association the PACS ends part-way through a job's objects: each later object fails."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydicom.dataset import FileMetaDataset

from dicomai.delivery.scu import _send_one

META = FileMetaDataset()
META.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.34"


class Association:
    def __init__(self, established: bool, raises: BaseException | None = None) -> None:
        self.is_established = established
        self.raises = raises

    def send_c_store(self, _path: Path) -> Any:
        if self.raises is not None:
            raise self.raises
        raise AssertionError("sent on an ended association")


def test_an_object_after_the_association_ended_is_a_failure_not_an_exception() -> None:
    error = _send_one(Association(False), Path("x.dcm"), META, "PACS@host:104")  # type: ignore[arg-type]
    assert error is not None and "ended before this object was sent" in str(error)


def test_an_association_lost_during_the_send_is_a_failure_not_an_exception() -> None:
    # pynetdicom's words when the peer aborted between its check and the send.
    lost = RuntimeError("The association with a peer SCP must be established")
    for raised in (lost, ConnectionResetError()):
        error = _send_one(Association(True, raised), Path("x.dcm"), META, "PACS@host:104")  # type: ignore[arg-type]
        assert error is not None and "lost while sending" in str(error)
