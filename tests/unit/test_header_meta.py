"""The listener's file meta group, written directly, is the one pydicom writes."""

from __future__ import annotations

from io import BytesIO

import pydicom
import pytest
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
)

from dicomai.ingest.header import encode_file_meta, encode_listener_meta, listener_file_meta

CT = "1.2.840.10008.5.1.4.1.1.2"


@pytest.mark.parametrize(
    ("sop_class", "sop_instance", "syntax", "ae"),
    [
        (CT, "1.2.3.4", ExplicitVRLittleEndian, "CT1"),
        (CT, "1.2.3.45", ImplicitVRLittleEndian, "MODALITY"),
        ("1.2.840.10008.5.1.4.1.1.1.1", "2.25." + "9" * 59, JPEG2000Lossless, "A"),
        (CT, "1.2.826.0.1.3680043.8.498.1", DeflatedExplicitVRLittleEndian, "SIXTEEN_CHARS_AE"),
        (CT, "1.2.3", ExplicitVRLittleEndian, ""),
        (CT, "1.2.3", ExplicitVRLittleEndian, "Ämter"),  # not ASCII: pydicom's path
        (CT, "1.2.3", ExplicitVRLittleEndian, "SEVENTEEN_CHARS_A"),  # too long: pydicom's path
    ],
)
def test_listener_meta_is_byte_for_byte_pydicoms(
    sop_class: str, sop_instance: str, syntax: str, ae: str
) -> None:
    meta = encode_listener_meta(sop_class, sop_instance, syntax, ae)

    assert meta == encode_file_meta(listener_file_meta(sop_class, sop_instance, syntax, ae))
    read = pydicom.dcmread(BytesIO(meta)).file_meta
    assert read.MediaStorageSOPInstanceUID == sop_instance
    assert read.TransferSyntaxUID == syntax
