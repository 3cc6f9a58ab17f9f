"""An instance put into a site's spool and SQL as the listener would, without the network."""

from __future__ import annotations

import hashlib
import struct
from io import BytesIO

from pydicom import Dataset
from sqlalchemy.orm import Session, sessionmaker

from dicomai.ingest.header import read_header
from dicomai.ingest.recorder import Received, record_instance
from dicomai.ingest.spool import Spool


def record_dataset(
    spool: Spool, sessions: sessionmaker[Session], ds: Dataset, calling_ae: str = "TEST"
) -> str:
    """Write `ds` as a DICOM file into `spool` and record it (row, study, audit); its path.

    The row holds what the listener reads from its header (`dicomai.ingest.header`).
    """
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    relative = spool.relative_path(str(ds.StudyInstanceUID), str(ds.SOPInstanceUID))
    spool.write(relative, [data])
    # As the listener reads it: the file meta group (its length at bytes 140-143), then the
    # dataset.
    meta_end = 144 + struct.unpack_from("<I", data, 140)[0]
    syntax = str(ds.file_meta.TransferSyntaxUID)
    header = read_header(syntax, data[:meta_end], data[meta_end:], max_inflated=1 << 30)
    received = Received(
        header,
        str(ds.file_meta.TransferSyntaxUID),
        relative,
        len(data),
        hashlib.sha256(data).hexdigest(),
        calling_ae,
    )
    record_instance(sessions, received)
    return relative


class RecordingDoorbell:
    """A doorbell that keeps the ids it was rung with, in order, instead of queueing tasks."""

    def __init__(self) -> None:
        self.jobs: list[int] = []
        self.deliveries: list[int] = []

    def ring_job(self, job_id: int) -> None:
        self.jobs.append(job_id)

    def ring_delivery(self, delivery_id: int) -> None:
        self.deliveries.append(delivery_id)
