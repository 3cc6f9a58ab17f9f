"""C-STORE responses encoded straight to bytes, as pynetdicom would encode them.

pynetdicom builds every response as a pydicom command set, fills it element by element and
writes it with pydicom: 0.3-0.5 ms of the ~6 ms one sender's C-STORE takes here. A plain
response (both UIDs, a status, no error comment or offending element) is seven elements of
Implicit VR Little Endian (PS3.7 §6.3.1, Table 9.3-2), written here byte for byte what
pynetdicom writes (`tests/unit/test_store_response.py`); anything else takes pynetdicom's path.
"""

from __future__ import annotations

import struct
from typing import Any, cast

from pynetdicom import evt
from pynetdicom._handlers import standard_dimse_sent_handler
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu_primitives import P_DATA

_C_STORE_RSP = 0x8001
_NO_DATA_SET = 0x0101
# PDV message control header: a command, the last fragment (PS3.8 Annex E.2).
_LAST_COMMAND_FRAGMENT = b"\x03"


def encode_store_response(primitive: C_STORE) -> bytes | None:
    """The command set of a plain C-STORE-RSP, or None where pynetdicom must encode it."""
    message_id = primitive.MessageIDBeingRespondedTo
    status = primitive.Status
    sop_class = primitive.AffectedSOPClassUID
    sop_instance = primitive.AffectedSOPInstanceUID
    if (
        message_id is None
        or status is None
        or not sop_class
        or not sop_instance
        or not (str(sop_class).isascii() and str(sop_instance).isascii())
        or primitive.ErrorComment is not None
        or primitive.OffendingElement is not None
    ):
        return None
    body = b"".join(
        [
            _element(0x0002, _uid(sop_class)),
            _element(0x0100, struct.pack("<H", _C_STORE_RSP)),
            _element(0x0120, struct.pack("<H", message_id)),
            _element(0x0800, struct.pack("<H", _NO_DATA_SET)),
            _element(0x0900, struct.pack("<H", status)),
            _element(0x1000, _uid(sop_instance)),
        ]
    )
    return _element(0x0000, struct.pack("<I", len(body))) + body


def _uid(value: str) -> bytes:
    data = str(value).encode("ascii")
    return data + b"\0" if len(data) % 2 else data


def _element(element: int, value: bytes) -> bytes:
    """A group 0000 element in Implicit VR Little Endian."""
    return struct.pack("<HHI", 0x0000, element, len(value)) + value


class StoreResponseDIMSE(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider, sending plain C-STORE responses without pydicom.

    Only where nothing could tell the difference: no handler but pynetdicom's standard one
    (which logs nothing for a C-STORE-RSP) is bound to EVT_DIMSE_SENT, and the command set
    fits one PDV.
    """

    def send_msg(self, primitive: Any, context_id: int) -> None:
        encoded = (
            encode_store_response(primitive)
            if isinstance(primitive, C_STORE) and self._quiet()
            else None
        )
        limit = self.maximum_pdu_size
        if encoded is None or (limit and len(encoded) > limit - 6):
            super().send_msg(primitive, context_id)
            return
        pdata = P_DATA()
        pdata.presentation_data_value_list.append((context_id, _LAST_COMMAND_FRAGMENT + encoded))
        self.dul.send_pdu(pdata)

    def _quiet(self) -> bool:
        # A notification event's handlers are a list of (callable, arguments).
        handlers = cast(list[tuple[Any, Any]], self.assoc.get_handlers(evt.EVT_DIMSE_SENT))
        return all(handler is standard_dimse_sent_handler for handler, _ in handlers)
