"""C-STORE responses written directly are the bytes pynetdicom writes, or left to it."""

from __future__ import annotations

import pytest
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE

from dicomai.ingest.store_response import encode_store_response
from dicomai.uids import IMPLEMENTATION_CLASS_UID

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"


def _response(message_id: int, status: int, sop_class: str, sop_instance: str) -> C_STORE:
    primitive = C_STORE()
    primitive.MessageIDBeingRespondedTo = message_id
    primitive.Status = status
    primitive.AffectedSOPClassUID = sop_class
    primitive.AffectedSOPInstanceUID = sop_instance
    return primitive


def _pynetdicom(primitive: C_STORE) -> bytes:
    message = C_STORE_RSP()
    message.primitive_to_message(primitive)
    (pdata,) = message.encode_msg(1, 0)
    ((context_id, pdv),) = pdata.presentation_data_value_list
    assert context_id == 1
    assert pdv[:1] == b"\x03"
    return pdv[1:]


@pytest.mark.parametrize("status", [0x0000, 0xA700, 0xC000, 0xB000, 0x0122])
@pytest.mark.parametrize("message_id", [1, 255, 65535])
@pytest.mark.parametrize(
    "sop_instance", ["1.2.3", "1.2.34", IMPLEMENTATION_CLASS_UID + ".12345678901234567"]
)
def test_a_plain_response_is_what_pynetdicom_encodes(
    status: int, message_id: int, sop_instance: str
) -> None:
    for sop_class in (CT_IMAGE, "1.2.840.10008.5.1.4.1.1.1.1"):
        primitive = _response(message_id, status, sop_class, sop_instance)
        assert encode_store_response(primitive) == _pynetdicom(primitive)


def test_responses_with_more_to_say_are_left_to_pynetdicom() -> None:
    commented = _response(1, 0xC000, CT_IMAGE, "1.2.3")
    commented.ErrorComment = "cannot understand"
    offending = _response(1, 0xA900, CT_IMAGE, "1.2.3")
    offending.OffendingElement = [0x00100010]
    missing = C_STORE()
    missing.MessageIDBeingRespondedTo = 1
    missing.Status = 0
    for primitive in (commented, offending, missing):
        assert encode_store_response(primitive) is None
