"""Lookup tables and windows that senders get wrong: each renders as a viewer shows it, or the
image is "not evaluated" with a reason, never a NaN input or a failed study."""

from __future__ import annotations

import logging
import struct
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

import dicomai.imaging.preprocess as preprocess
import dicomai.jobs.reading as reading
from dicomai.errors import NotEvaluable
from dicomai.imaging.preprocess import prepare, render
from dicomai.imaging.spec import InputSpec
from dicomai.jobs.reading import read_image

PATIENT_NAME = "Doe^Jane"
CR = "1.2.840.10008.5.1.4.1.1.1"


def image(pixels: np.ndarray, signed: bool = False, **attributes: object) -> Dataset:
    """A 16-bit CR as a PACS sends it."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = CR
    ds.SOPClassUID, ds.SOPInstanceUID = CR, generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID, ds.Modality = PATIENT_NAME, "PID-4711", "CR"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = int(signed)
    ds.PixelData = pixels.astype("<i2" if signed else "<u2").tobytes()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def voi_lut(descriptor: list[int], data: list[int] | bytes) -> Sequence:
    item = Dataset()
    item.LUTDescriptor = descriptor
    item["LUTDescriptor"].VR = "US"
    item.LUTData = data
    item["LUTData"].VR = "OW" if isinstance(data, bytes) else "US"
    return Sequence([item])


# Every stored value 0..4095 once, as a 12-bit radiograph holds them.
RAMP_4096 = np.arange(4096, dtype=np.uint16).reshape(64, 64)


# --- VOI LUT Sequence ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bits", "encoding"), [(8, "US"), (8, "OW"), (12, "US"), (16, "US"), (16, "OW")]
)
def test_a_voi_lut_of_any_entry_depth_maps_every_input_value(bits: int, encoding: str) -> None:
    # PS3.3 C.11.2.1.1: 8 bits per entry with 4096 entries is allowed; pydicom indexed it in
    # uint8, so input 256 and over wrapped and the model saw a sawtooth.
    lut = np.arange(4096) >> (12 - bits) if bits < 12 else np.arange(4096) << (bits - 12)
    data = lut.astype("<u2").tobytes() if encoding == "OW" else lut.tolist()
    ds = image(RAMP_4096, VOILUTSequence=voi_lut([4096, 0, bits], data))
    expected = lut[RAMP_4096] / float(2 ** int(lut.max()).bit_length() - 1)
    assert np.allclose(render(ds), expected, atol=1e-6)


def test_a_voi_lut_with_its_negative_first_value_written_unsigned_is_read_signed() -> None:
    # -1024 sent as US 64512 on signed CT data: every pixel fell below the table, all black.
    hu = np.linspace(-1024, 3071, 64 * 64).round().reshape(64, 64).astype(np.int16)
    lut = (np.arange(4096) >> 4).tolist()
    ds = image(hu, signed=True, VOILUTSequence=voi_lut([4096, 64512, 8], lut))
    expected = ((hu.astype(int) + 1024) >> 4) / 255.0
    assert np.allclose(render(ds), expected, atol=1e-6)


@pytest.mark.parametrize(
    ("descriptor", "data"),
    [
        ([4096, 0, 16], list(range(100))),  # data shorter than the descriptor
        ([4096, 0, 16], bytes(200)),  # OW data shorter than the descriptor
        ([4096, 0, 4], list(range(4096))),  # 4 bits per entry
        ([4096, 0], list(range(4096))),  # descriptor of two values
    ],
)
def test_an_invalid_voi_lut_gives_way_to_the_window(descriptor: list[int], data: object) -> None:
    # A short VOI LUT raised struct.error, which failed the job of the whole study.
    item = Dataset()
    item.LUTDescriptor, item.LUTData = descriptor, data
    windowed = image(RAMP_4096, WindowCenter=2048, WindowWidth=1024)
    ds = image(RAMP_4096, WindowCenter=2048, WindowWidth=1024, VOILUTSequence=Sequence([item]))
    assert np.array_equal(render(ds), render(windowed))


# --- windows -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("center", "width"),
    [
        (float("nan"), 500.0),
        (2048.0, float("nan")),
        (float("inf"), 500.0),
        (2048.0, float("inf")),
        (float("-inf"), float("inf")),
    ],
)
@pytest.mark.parametrize("function", [None, "SIGMOID", "LINEAR_EXACT"])
def test_a_window_that_is_not_finite_is_passed_over(
    center: float, width: float, function: str | None
) -> None:
    extra = {"VOILUTFunction": function} if function else {}
    automatic = render(image(RAMP_4096))
    ds = image(RAMP_4096, WindowCenter=center, WindowWidth=width, **extra)
    _, model_input = prepare(ds, InputSpec(size=(32, 32)))
    assert np.isfinite(model_input).all(), "a non-finite window reached the model"
    assert np.array_equal(render(ds), automatic), "expected the automatic window"
    # The next window of the list is used, as a viewer offers it.
    ds = image(RAMP_4096, WindowCenter=[center, 1000], WindowWidth=[width, 400], **extra)
    expected = image(RAMP_4096, WindowCenter=1000, WindowWidth=400, **extra)
    assert np.array_equal(render(ds), render(expected))


def test_render_refuses_a_non_finite_result(monkeypatch) -> None:
    nan_image = np.full((64, 64), np.nan, dtype=np.float32)
    monkeypatch.setattr(preprocess, "_render", lambda *args: nan_image)
    with pytest.raises(NotEvaluable, match="non-finite"):
        render(image(RAMP_4096))


def test_a_window_past_every_pixel_is_not_evaluated() -> None:
    ds = image(RAMP_4096, WindowCenter=60000, WindowWidth=100)
    with pytest.raises(NotEvaluable, match="without contrast"):
        render(ds)


def test_a_constant_image_under_a_window_is_still_rendered() -> None:
    ds = image(np.full((64, 64), 700, dtype=np.uint16), WindowCenter=60000, WindowWidth=100)
    assert not render(ds).any()


# --- modality LUT and palette -----------------------------------------------------------


def test_a_short_modality_lut_is_not_evaluated() -> None:
    item = Dataset()
    item.LUTDescriptor, item.ModalityLUTType = [4096, 0, 16], "US"
    item.LUTData = bytes(100)
    item["LUTData"].VR = "OW"
    ds = image(RAMP_4096, ModalityLUTSequence=Sequence([item]))
    with pytest.raises(NotEvaluable, match="modality LUT"):
        render(ds)


def palette_image(bits: int, data: bytes, entries: int = 256) -> Dataset:
    ds = image(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) % 256)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = (np.arange(64 * 64) % 256).astype(np.uint8).tobytes()
    ds.PhotometricInterpretation = "PALETTE COLOR"
    for colour in ("Red", "Green", "Blue"):
        setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [entries, 0, bits])
        ds[f"{colour}PaletteColorLookupTableDescriptor"].VR = "US"
        setattr(ds, f"{colour}PaletteColorLookupTableData", data)
        ds[f"{colour}PaletteColorLookupTableData"].VR = "OW"
    return ds


def test_a_palette_of_8_bit_entries_in_16_bit_words_is_not_black() -> None:
    # The legacy encoding PS3.3 C.7.6.3.1.5 notes: values 0-255, one per 16-bit word. Scaled
    # by 65535 they rendered the image black.
    ds = palette_image(8, np.arange(256, dtype="<u2").tobytes())
    expected = (np.arange(64 * 64) % 256).reshape(64, 64) / 255.0
    assert np.allclose(render(ds), expected, atol=1e-5)


@pytest.mark.parametrize(
    ("bits", "data"),
    [
        (12, np.arange(256, dtype="<u2").tobytes()),  # neither 8 nor 16 bits
        (16, np.arange(16, dtype="<u2").tobytes()),  # 16 entries of 256
    ],
    ids=["12 bits", "short data"],
)
def test_a_malformed_palette_is_not_evaluated(bits: int, data: bytes) -> None:
    with pytest.raises(NotEvaluable, match="palette"):
        render(palette_image(bits, data))


# --- one image of a study ------------------------------------------------------------------


def test_an_unexpected_error_preparing_one_image_spares_the_others(
    monkeypatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good, bad = image(RAMP_4096), image(RAMP_4096 // 2)
    paths = {}
    for name, ds in (("good", good), ("bad", bad)):
        paths[name] = tmp_path / f"{name}.dcm"
        ds.save_as(paths[name], enforce_file_format=True)
    real = reading.prepare

    def prepare_or_fail(ds: Dataset, spec: InputSpec, frame: int = 0):
        if ds.SOPInstanceUID == bad.SOPInstanceUID:
            raise struct.error(f"unpack requires a buffer of 8192 bytes ({PATIENT_NAME})")
        return real(ds, spec, frame)

    monkeypatch.setattr(reading, "prepare", prepare_or_fail)
    spec = InputSpec(size=(32, 32))
    with caplog.at_level(logging.WARNING, logger="dicomai.jobs.reading"):
        failed = read_image(bad.SOPInstanceUID, paths["bad"], spec)
    evaluated = read_image(good.SOPInstanceUID, paths["good"], spec)
    assert failed.tensor is None and failed.reason == "image could not be prepared (error)"
    assert failed.source is not None, "the SR must still name the image as not evaluated"
    assert evaluated.tensor is not None and evaluated.reason is None
    assert bad.SOPInstanceUID in caplog.text and PATIENT_NAME not in caplog.text


def test_a_storage_error_still_fails_the_job(monkeypatch, tmp_path: Path) -> None:
    path = tmp_path / "image.dcm"
    image(RAMP_4096).save_as(path, enforce_file_format=True)

    def unreadable(*args, **kwargs):
        raise OSError("disk gone")

    monkeypatch.setattr(reading, "prepare", unreadable)
    with pytest.raises(OSError):
        read_image("1.2.3", path, InputSpec(size=(32, 32)))
