"""An instance put into a site's spool and SQL as the listener would, without the network."""

from __future__ import annotations

import hashlib
from io import BytesIO

from pydicom import Dataset
from sqlalchemy.orm import Session, sessionmaker

from dicomai.ingest.header import Header
from dicomai.ingest.recorder import Received, record_instance
from dicomai.ingest.spool import Spool


def record_dataset(
    spool: Spool, sessions: sessionmaker[Session], ds: Dataset, calling_ae: str = "TEST"
) -> str:
    """Write `ds` as a DICOM file into `spool` and record it (row, study, audit); its path.

    The row holds what the listener reads from a header (`dicomai.ingest.header`): UIDs,
    modality and body part.
    """
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    data = buffer.getvalue()
    relative = spool.relative_path(str(ds.StudyInstanceUID), str(ds.SOPInstanceUID))
    spool.write(relative, [data])
    header = Header(
        str(ds.StudyInstanceUID),
        str(ds.SeriesInstanceUID),
        str(ds.SOPInstanceUID),
        str(ds.SOPClassUID),
        ds.get("Modality"),
        ds.get("BodyPartExamined"),
    )
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
