"""C-STORE SCU: send one stored output object to a PACS."""

from __future__ import annotations

from pathlib import Path

from pydicom import dcmread
from pynetdicom import AE, evt
from pynetdicom.presentation import build_context

from dicomai.errors import DeliveryError
from dicomai.sockets import set_nodelay


def send_file(
    path: Path, *, ae_title: str, host: str, port: int, calling_ae: str, timeout: float
) -> None:
    """Send the DICOM file at `path` with C-STORE; return only when the peer answered Success.

    Raises
    ------
    DeliveryError
        No association, a failure status, or no answer within `timeout`.
    """
    ds = dcmread(path)
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.requested_contexts = [build_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)]
    assoc = ae.associate(
        host, port, ae_title=ae_title, evt_handlers=[(evt.EVT_CONN_OPEN, set_nodelay)]
    )
    if not assoc.is_established:
        raise DeliveryError(f"association with {ae_title}@{host}:{port} not established")
    try:
        status = assoc.send_c_store(ds)
    finally:
        assoc.release()
    code = getattr(status, "Status", None)
    if code is None:
        raise DeliveryError(f"no C-STORE response from {ae_title}@{host}:{port}")
    # PS3.4 B.2.3: 0xB000, 0xB007, 0xB006 are warnings; the object is stored.
    if code not in (0x0000, 0xB000, 0xB006, 0xB007):
        raise DeliveryError(f"{ae_title}@{host}:{port} answered status 0x{code:04X}")
