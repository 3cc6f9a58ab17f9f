"""C-STORE SCU: send stored output objects to a PACS over one association."""

from __future__ import annotations

from pathlib import Path

from pydicom.dataset import FileMetaDataset
from pydicom.filereader import read_file_meta_info
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association
from pynetdicom.presentation import build_context

from dicomai.errors import DeliveryError
from dicomai.sockets import set_nodelay

# A file is sent as its stored bytes, read in chunks, rather than decoded and encoded again:
# an SR of a 100-image study took a third of a second each way.
_config.STORE_SEND_CHUNKED_DATASET = True


def send_files(
    paths: list[Path], *, ae_title: str, host: str, port: int, calling_ae: str, timeout: float
) -> list[DeliveryError | None]:
    """Send DICOM files over one association; return each file's outcome (None: stored).

    One association for all of a job's objects: opening one per object cost more than the
    objects themselves (a 100-image study has 100 overlays).
    """
    metas = [read_file_meta_info(path) for path in paths]
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    pairs = {(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID) for meta in metas}
    ae.requested_contexts = [build_context(sop, syntax) for sop, syntax in sorted(pairs)]
    where = f"{ae_title}@{host}:{port}"
    assoc = ae.associate(
        host, port, ae_title=ae_title, evt_handlers=[(evt.EVT_CONN_OPEN, set_nodelay)]
    )
    if not assoc.is_established:
        error = DeliveryError(f"association with {where} not established")
        return [error for _ in paths]
    try:
        return [
            _send_one(assoc, path, meta, where) for path, meta in zip(paths, metas, strict=True)
        ]
    finally:
        if assoc.is_established:
            assoc.release()


def _send_one(
    assoc: Association, path: Path, meta: FileMetaDataset, where: str
) -> DeliveryError | None:
    if not assoc.is_established:
        return DeliveryError(f"association with {where} ended before this object was sent")
    try:
        status = assoc.send_c_store(path)
    except ValueError:
        # pynetdicom raises when the peer accepted no context for this SOP class and syntax.
        name = meta.MediaStorageSOPClassUID.name
        return DeliveryError(f"{where} accepted no presentation context for {name}")
    except (RuntimeError, OSError):
        # The peer closed or aborted the association between two checks (pynetdicom says
        # RuntimeError) or the socket failed: this object's attempt failed, like the rest.
        return DeliveryError(f"association with {where} lost while sending")
    return _outcome(status, where)


def _outcome(status: object, where: str) -> DeliveryError | None:
    code = getattr(status, "Status", None)
    if code is None:
        return DeliveryError(f"no C-STORE response from {where}")
    # PS3.4 B.2.3: 0xB000, 0xB007, 0xB006 are warnings; the object is stored.
    if code not in (0x0000, 0xB000, 0xB006, 0xB007):
        return DeliveryError(f"{where} answered status 0x{code:04X}")
    return None
