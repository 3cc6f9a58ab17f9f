"""A resend in another transfer syntax compared with the stored instance by its content."""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLSNearLossless,
    RLELossless,
)

from dicomai.ingest.same_content import same_content

PREAMBLE_AND_META = 132  # bytes split as the listener does: file meta, then the dataset


def _received(ds: pydicom.Dataset) -> tuple[bytes, bytes]:
    """(file meta, dataset) bytes of `ds` as the listener has them in memory."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    encoded = buffer.getvalue()
    meta_end = PREAMBLE_AND_META + 12 + int.from_bytes(encoded[140:144], "little")
    return encoded[:meta_end], encoded[meta_end:]


def _stored(tmp_path: Path, ds: pydicom.Dataset) -> Path:
    path = tmp_path / "stored.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def _ct() -> pydicom.Dataset:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    return ds


def _as(ds: pydicom.Dataset, syntax: str) -> pydicom.Dataset:
    copy = pydicom.dcmread(io.BytesIO(_encoded(ds)))
    if syntax == RLELossless:
        copy.compress(RLELossless, generate_instance_uid=False)
    else:
        copy.file_meta.TransferSyntaxUID = syntax
    return copy


def _encoded(ds: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, RLELossless])
def test_the_same_image_in_another_lossless_syntax_is_the_same_content(
    tmp_path: Path, syntax: str
) -> None:
    stored = _stored(tmp_path, _ct())
    meta, dataset = _received(_as(_ct(), syntax))
    assert same_content(stored, meta, dataset), f"{syntax} resend counted as a change"


def test_a_changed_attribute_or_pixel_is_different_content(tmp_path: Path) -> None:
    stored = _stored(tmp_path, _ct())
    changed = _as(_ct(), ImplicitVRLittleEndian)
    changed.SeriesDescription = "corrected"
    assert not same_content(stored, *_received(changed))

    pixels = _ct()
    array = pixels.pixel_array.copy()
    array[0, 0] += 1
    pixels.PixelData = array.tobytes()
    assert not same_content(stored, *_received(_as(pixels, ImplicitVRLittleEndian)))


def test_same_syntax_lossy_syntax_or_undecodable_data_is_different(tmp_path: Path) -> None:
    stored = _stored(tmp_path, _ct())
    # The same syntax and other bytes: a change the digest already saw rightly.
    assert not same_content(stored, *_received(_as(_ct(), ExplicitVRLittleEndian)))

    # JPEG-LS Near-Lossless, though at error 0 its pixels decode equal: the syntax may lose.
    near = _as(_ct(), ExplicitVRLittleEndian)
    near.compress(JPEGLSNearLossless, jls_error=0, generate_instance_uid=False)
    assert not same_content(stored, *_received(near))

    meta, dataset = _received(_as(_ct(), ImplicitVRLittleEndian))
    assert not same_content(stored, meta, dataset[: len(dataset) // 2])
    assert not same_content(tmp_path / "missing.dcm", meta, dataset)
