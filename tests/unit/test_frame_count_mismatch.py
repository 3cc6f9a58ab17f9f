"""Number of Frames against the frames the pixel data hold, compressed or not.

A source that says more frames than it holds is not evaluated, whichever frame the model reads
and whichever compression it uses; one that holds more than it says is read by the frames it
says, with one warning naming it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, encapsulate_extended, generate_frames
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless, RLELossless, generate_uid

from dicomai.errors import NotEvaluable
from dicomai.imaging.decode import pixel_frames, read_instance
from dicomai.imaging.spec import InputSpec
from dicomai.jobs.reading import read_image

PATIENT_NAME = "Doe^Jane"
PATIENT_ID = "PID-4711"
SIZE = 64
FIRST = InputSpec(size=(SIZE, SIZE))
ALL = InputSpec(size=(SIZE, SIZE), frames="all")


def frame_pixels(count: int) -> np.ndarray:
    """`count` frames that differ from each other and are not blank: frame k is a ramp
    starting at 10 * (k + 1)."""
    ramp = np.arange(SIZE, dtype=np.uint8)[np.newaxis, :].repeat(SIZE, axis=0)
    return np.stack([ramp + 10 * (k + 1) for k in range(count)]).astype(np.uint8)


def multi_frame(count: int) -> Dataset:
    """A Multi-frame Grayscale Byte Secondary Capture of `count` frames, uncompressed."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7.2"
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.Modality = "OT"
    ds.Rows = ds.Columns = SIZE
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.NumberOfFrames = count
    ds.PixelData = frame_pixels(count).tobytes()
    return ds


def encoded(count: int, encoding: str) -> Dataset:
    """`count` frames as `encoding` lays them out: "native", "rle" (pydicom's encoder, with a
    Basic Offset Table), "rle-no-bot" (the same fragments without one, as many archives send
    them), "rle-extended" (an Extended Offset Table), or "jpegls-2-fragments" (each JPEG-LS
    frame in two fragments, no offset table)."""
    ds = multi_frame(count)
    if encoding == "native":
        return ds
    ds.compress(JPEGLSLossless if encoding.startswith("jpegls") else RLELossless)
    frames = list(generate_frames(ds.PixelData, number_of_frames=count))
    if encoding == "rle-no-bot":
        ds.PixelData = encapsulate(frames, has_bot=False)
    elif encoding == "rle-extended":
        ds.PixelData, ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths = encapsulate_extended(
            frames
        )
    elif encoding == "jpegls-2-fragments":
        ds.PixelData = encapsulate(frames, fragments_per_frame=2, has_bot=False)
    ds["PixelData"].is_undefined_length = True
    return ds


def saved(ds: Dataset, tmp_path: Path) -> Path:
    path = tmp_path / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


ENCAPSULATED = ["rle", "rle-no-bot", "rle-extended", "jpegls-2-fragments"]


@pytest.mark.parametrize("encoding", ENCAPSULATED)
@pytest.mark.parametrize("spec", [FIRST, ALL], ids=["first", "all"])
def test_compressed_data_with_fewer_frames_than_declared_are_not_evaluated(
    tmp_path: Path, encoding: str, spec: InputSpec
) -> None:
    # frames="first" evaluated frame 1 and reported it as the image; frames="all" gave
    # "frame 4: pixel data could not be decoded (RLE Lossless)", which sent an administrator
    # looking for a decoder.
    ds = encoded(3, encoding)
    ds.NumberOfFrames = 5
    read = read_image(ds.SOPInstanceUID, saved(ds, tmp_path), spec)
    assert read.tensor is None, "an image lacking two of its frames was evaluated"
    assert read.reason == "Number of Frames is 5, the pixel data hold 3 frames"
    assert read.source is not None, "the SR names the image as not evaluated"


@pytest.mark.parametrize("frame", [0, 2, 4])
def test_every_frame_of_a_short_compressed_image_is_refused_for_the_count(frame: int) -> None:
    ds = encoded(3, "rle")
    ds.NumberOfFrames = 5
    with pytest.raises(NotEvaluable, match="Number of Frames is 5, the pixel data hold 3 frames"):
        pixel_frames(ds, index=frame)


@pytest.mark.parametrize("encoding", ["native", *ENCAPSULATED])
def test_a_short_image_is_not_evaluated_whatever_its_compression(
    tmp_path: Path, encoding: str
) -> None:
    ds = encoded(3, encoding)
    ds.NumberOfFrames = 5
    path = saved(ds, tmp_path)
    for spec in (FIRST, ALL):
        read = read_image(ds.SOPInstanceUID, path, spec)
        assert read.tensor is None and read.frames == (), (spec.frames, read.reason)
        assert read.reason is not None and "could not be decoded" not in read.reason
        assert PATIENT_NAME not in read.reason and PATIENT_ID not in read.reason


@pytest.mark.parametrize("encoding", ["native", *ENCAPSULATED])
def test_frames_past_the_declared_ones_are_left_out_with_one_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, encoding: str
) -> None:
    ds = encoded(3, encoding)
    ds.NumberOfFrames = 2
    path = saved(ds, tmp_path)
    with caplog.at_level(logging.WARNING, logger="dicomai"):
        read = read_image(ds.SOPInstanceUID, path, ALL)
    assert read.reason is None, read.reason
    assert read.frame_indices == (0, 1), "the declared frames are the ones evaluated"
    warnings = [r.getMessage() for r in caplog.records if r.name.startswith("dicomai")]
    assert warnings == [
        f"{ds.SOPInstanceUID}: Number of Frames is 2, the pixel data hold 3 frames; "
        "only the first 2 are read"
    ], "one warning per image, naming it and both counts"
    assert not any(PATIENT_NAME in m or PATIENT_ID in m for m in caplog.messages)


@pytest.mark.parametrize("encoding", ["native", *ENCAPSULATED])
def test_the_declared_frames_decode_to_their_own_pixels(encoding: str) -> None:
    # Without a Basic Offset Table pydicom took the three RLE fragments for frame 1 and had
    # no frame 2 ("could not be decoded").
    ds = encoded(3, encoding)
    ds.NumberOfFrames = 2
    expected = frame_pixels(3)
    assert np.array_equal(pixel_frames(ds), expected[:2])
    assert np.array_equal(pixel_frames(ds, index=1)[0], expected[1])


@pytest.mark.parametrize("encoding", ["native", *ENCAPSULATED])
def test_an_image_holding_its_declared_frames_is_read_without_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, encoding: str
) -> None:
    # The JPEG-LS frames in two fragments each, without an offset table: counted by their
    # end-of-image markers, not taken for six frames.
    ds = encoded(3, encoding)
    with caplog.at_level(logging.WARNING, logger="dicomai"):
        read = read_image(ds.SOPInstanceUID, saved(ds, tmp_path), ALL)
    assert read.reason is None and read.frame_indices == (0, 1, 2)
    assert not [r.getMessage() for r in caplog.records if r.name.startswith("dicomai")]
    dataset = read_instance(saved(ds, tmp_path))
    assert np.array_equal(pixel_frames(dataset), frame_pixels(3))
