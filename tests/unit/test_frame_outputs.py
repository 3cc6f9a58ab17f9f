"""What a multi-frame source's results say of its frames.

- With ``frames = "all"``, an image of several frames in a single-frame IOD (a plain Secondary
  Capture) is read by its first frame: a reference to it carries no frame number, so a finding
  on frame 2 was drawn by the viewer on frame 1, where there was nothing.
- The overlay of a multi-frame source says which frame it shows, in its caption and its
  Derivation Description: a radiologist who opened the cine on frame 1 found nothing.
- A multi-frame image read by a blank first frame is "frame 1 is blank", not "image is
  blank": an XA run with a dark lead-in frame is not blank.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from test_results import _saved, drawn_captions, make_context

from dicomai.imaging.preprocess import prepare
from dicomai.imaging.spec import InputSpec
from dicomai.jobs.reading import prepare_frames, read_image
from dicomai.results.context import ResultContext, SourceImage
from dicomai.results.sc import OverlayBuilder, build_sc, caption_lines, render_caption
from dicomai.results.sr import build_sr

SINGLE_FRAME_SC = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage
MULTI_FRAME_BYTE_SC = "1.2.840.10008.5.1.4.1.1.7.2"
MULTI_FRAME_WORD_SC = "1.2.840.10008.5.1.4.1.1.7.3"
ALL = InputSpec(size=(32, 32), frames="all")
FIRST = InputSpec(size=(32, 32))
BLANK_FRAME_1 = "frame 1 is blank: every pixel has the same value"


def frames_of(*means: float) -> np.ndarray:
    """Frames of 48² noise around each of `means`; a mean of 0 is a blank frame."""
    rng = np.random.default_rng(5)
    frames = [
        np.clip(rng.normal(mean, 30, (48, 48)), 0, 255) if mean else np.zeros((48, 48))
        for mean in means
    ]
    return np.stack(frames).astype(np.uint8)


def byte_image(frames: np.ndarray, sop_class: str = MULTI_FRAME_BYTE_SC) -> pydicom.Dataset:
    """An 8-bit grey image of `frames` (frames, rows, cols) of `sop_class`."""
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.Modality = "OT"
    if len(frames) > 1:
        ds.NumberOfFrames = len(frames)
    ds.Rows, ds.Columns = frames.shape[1:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = frames.tobytes()
    return ds


def read_saved(ds: pydicom.Dataset, folder: Path, spec: InputSpec):
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return read_image(ds.SOPInstanceUID, path, spec)


# 1. frames = "all" and a single-frame IOD


def test_frames_all_reads_a_single_frame_iod_of_several_frames_by_its_first(tmp_path) -> None:
    ds = byte_image(frames_of(60, 130, 200), SINGLE_FRAME_SC)

    prepared = prepare_frames(ds, ALL)
    image = read_saved(ds, tmp_path, ALL)

    # The frame the result is for is the frame a reference without a frame number names.
    assert prepared.indices == (0,), "a frame the SR cannot name was evaluated"
    assert len(prepared.inputs) == 1
    assert np.array_equal(prepared.inputs[0], prepare(ds, ALL, 0)[1])
    assert image.reason is None and image.frames == (), "several frames left to report by"
    assert image.source is not None and image.source.frame == 0
    assert np.array_equal(image.tensor, prepare(ds, ALL, 0)[1])


def test_frames_all_still_reads_every_frame_of_a_multi_frame_iod(tmp_path) -> None:
    ds = byte_image(frames_of(60, 130, 200), MULTI_FRAME_BYTE_SC)

    assert prepare_frames(ds, ALL).indices == (0, 1, 2)
    assert read_saved(ds, tmp_path, ALL).frame_indices == (0, 1, 2)


def test_frames_all_trusts_an_instance_without_a_sop_class() -> None:
    # `dicomai evaluate` reads files without one: they keep every frame, as before.
    ds = byte_image(frames_of(60, 130, 200))
    del ds.SOPClassUID

    assert prepare_frames(ds, ALL).indices == (0, 1, 2)


# 2. The overlay names its frame


def multi_frame_context(frames: int, shown: tuple[int, ...]) -> ResultContext:
    """`make_context`'s study, with a source of `frames` frames per item of `shown`, each
    reported by that (zero-based) frame, and a single-frame CR after them."""
    base = make_context()
    cr = base.sources[2]
    sources, predictions = [], []
    for number, frame in enumerate(shown):
        ds = copy.deepcopy(cr.dataset)
        ds.SOPClassUID = MULTI_FRAME_WORD_SC
        ds.SOPInstanceUID = f"1.2.826.0.1.3680043.8.498.79.{number + 1}"
        ds.InstanceNumber = number + 1
        ds.NumberOfFrames = frames
        ds.FrameIncrementPointer = 0x00181063  # Frame Time
        ds.FrameTime = 100
        ds.PixelData = ds.PixelData * frames
        sources.append(SourceImage(ds, cr.display, frame))
        # The CT's positive prediction (87 %), for this source.
        predictions.append(
            dataclasses.replace(base.predictions[0], sop_instance_uid=ds.SOPInstanceUID)
        )
    return dataclasses.replace(
        base, sources=(*sources, cr), predictions=(*predictions, base.predictions[2])
    )


def test_the_overlay_of_a_multi_frame_source_names_its_frame(tmp_path, monkeypatch) -> None:
    context = multi_frame_context(8, (5,))

    drawn = drawn_captions(context, monkeypatch)
    sc = build_sc(context, 0)

    assert drawn[0] == "Pneumothorax: 87%, frame 6 of 8"
    assert drawn[1:] == [
        "chest-ptx 1.2.0",
        "report #1, 2026-11-25 02:04",
        "AI generated - not for primary diagnosis",
    ]
    assert sc.DerivationDescription == (
        "Grad-CAM++ heat map (Pneumothorax: 87%) blended over frame 6 of 8 of the source "
        "image; chest-ptx 1.2.0 - report #1, 2026-11-25 02:04"
    )
    assert sc.SourceImageSequence[0].ReferencedFrameNumber == 6
    _saved(sc, tmp_path, "sc.dcm")
    _saved(build_sr(context), tmp_path, "sr.dcm")


def test_a_single_frame_sources_overlay_is_unchanged() -> None:
    context = multi_frame_context(8, (5,))

    cr = len(context.sources) - 1
    assert caption_lines(context, cr)[0] == "Pneumothorax: 12%"
    assert build_sc(context, cr).DerivationDescription.startswith(
        "Grad-CAM++ heat map (Pneumothorax: 12%) blended over the source image; "
    )


def test_each_overlay_of_a_study_names_its_own_frame(tmp_path) -> None:
    # The second overlay is a copy of the first (`OverlayBuilder`): it must not keep its frame.
    context = multi_frame_context(120, (0, 119))
    builder = OverlayBuilder(context)

    first, second = builder.build(0), builder.build(1)

    assert "blended over frame 1 of 120 of" in first.DerivationDescription
    assert "blended over frame 120 of 120 of" in second.DerivationDescription
    _saved(second, tmp_path, "second.dcm")


@pytest.mark.parametrize("width", [384, 512, 1024])
def test_the_frame_keeps_the_caption_at_four_lines_of_the_same_size(width) -> None:
    # The font is fitted to the longest line: the frame must not make every line smaller.
    many = multi_frame_context(120, (119,))
    single = make_context()

    with_frame, without = caption_lines(many, 0), caption_lines(single, 0)

    assert len(with_frame) == len(without) == 4
    assert with_frame[0].endswith(", frame 120 of 120")
    assert render_caption(with_frame, width).shape == render_caption(without, width).shape


# 3. A blank first frame


def test_a_blank_first_frame_is_named_as_such(tmp_path) -> None:
    run = byte_image(frames_of(0, 130, 200))  # a dark lead-in frame, then the run

    image = read_saved(run, tmp_path, FIRST)

    assert image.tensor is None and image.source is not None, "the SR must name it"
    assert image.reason == BLANK_FRAME_1


def test_a_single_frame_iod_of_several_frames_read_by_a_blank_first_frame(tmp_path) -> None:
    ds = byte_image(frames_of(0, 130), SINGLE_FRAME_SC)

    assert read_saved(ds, tmp_path, ALL).reason == BLANK_FRAME_1


def test_a_blank_single_frame_image_is_still_an_image_that_is_blank(tmp_path) -> None:
    image = read_saved(byte_image(frames_of(0)), tmp_path, ALL)

    assert image.reason == "image is blank: every pixel has the same value"
