"""An overlay of a source with non-square pixels shows its anatomy in true proportion."""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pydicom
import pytest
from test_results import _saved, make_context

from dicomai.results.context import ResultContext, SourceImage
from dicomai.results.sc import OverlayBuilder, build_sc, caption_lines, render_caption

RADIUS = 20.0
SIZE = 128


def _disc(aspect: float) -> np.ndarray:
    """A display of a disc round in the patient, RADIUS pixel widths, on pixels `aspect`
    times taller than wide."""
    rows, columns = np.mgrid[:SIZE, :SIZE]
    y = (rows - SIZE / 2 + 0.5) * aspect
    x = columns - SIZE / 2 + 0.5
    return np.where(x**2 + y**2 <= RADIUS**2, 255, 0).astype(np.uint8)


def _context(keyword: str, value: list[float]) -> ResultContext:
    """The CT of `make_context` with its pixel size stated by `keyword` and a disc drawn on
    it, its heat map cold so the disc shows as it is."""
    base = make_context()
    ct = copy.deepcopy(base.sources[0].dataset)
    ct.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.99"
    del ct.PixelSpacing
    setattr(ct, keyword, value)
    prediction = dataclasses.replace(
        base.predictions[0],
        sop_instance_uid=ct.SOPInstanceUID,
        heatmap=np.zeros((128, 128), dtype=np.float32),
    )
    return dataclasses.replace(
        base,
        sources=(SourceImage(ct, _disc(value[0] / value[1])),),
        predictions=(prediction,),
    )


def _image(sc: pydicom.Dataset, context: ResultContext) -> np.ndarray:
    """The SC's pixels above its caption band, one channel (the heat map is cold)."""
    pixels = sc.pixel_array
    band = render_caption(caption_lines(context, 0), pixels.shape[1])
    return pixels[: pixels.shape[0] - band.shape[0], :, 0]


def _extent(image: np.ndarray) -> tuple[int, int]:
    rows, columns = np.nonzero(image > 127)
    return int(rows.max() - rows.min() + 1), int(columns.max() - columns.min() + 1)


@pytest.mark.parametrize(
    ("keyword", "value"),
    [
        ("PixelSpacing", [0.5, 1.25]),
        ("PixelSpacing", [1.0, 0.8]),  # taller than wide; wide enough for no margins
        ("ImagerPixelSpacing", [0.5, 1.25]),
        ("PixelAspectRatio", [2, 5]),
    ],
)
def test_a_round_disc_on_non_square_pixels_is_round_in_the_overlay(tmp_path, keyword, value):
    context = _context(keyword, value)

    read = pydicom.dcmread(_saved(build_sc(context, 0), tmp_path, "sc.dcm"))

    image = _image(read, context)
    height, width = _extent(image)
    assert abs(height - width) <= 0.03 * max(height, width), (
        f"the disc is {height} x {width} pixels: the overlay is not in true proportion"
    )
    aspect = value[0] / value[1]
    assert image.shape[0] / image.shape[1] == pytest.approx(aspect, rel=0.02)
    assert max(image.shape) == 512, "the longest side is not scaled to the minimum"
    assert "PixelAspectRatio" not in read, "the SC's pixels are square: no ratio to state"


def test_the_copies_of_a_studys_first_overlay_keep_their_own_proportion(tmp_path):
    square = make_context()
    anisotropic = _context("PixelSpacing", [0.5, 1.25])
    context = dataclasses.replace(
        square,
        sources=(square.sources[0], anisotropic.sources[0]),
        predictions=(square.predictions[0], anisotropic.predictions[0]),
    )
    builder = OverlayBuilder(context)

    first = builder.build(0)
    copied = pydicom.dcmread(_saved(builder.build(1), tmp_path, "sc.dcm"))

    assert (first.Rows, first.Columns) != (copied.Rows, copied.Columns)
    height, width = _extent(_image(copied, anisotropic))
    assert abs(height - width) <= 0.03 * max(height, width)


def test_a_source_with_square_nearly_square_or_unknown_pixels_keeps_its_shape():
    context = make_context()  # CT_small: 128² of 0.661468 mm pixels; the CR states none
    context.sources[1].dataset.PixelSpacing = [0.7, 0.703]  # the MR, evaluated here
    context = dataclasses.replace(
        context,
        predictions=(
            context.predictions[0],
            dataclasses.replace(context.predictions[0], sop_instance_uid="mr"),
            context.predictions[2],
        ),
    )

    for index in range(3):
        sc = build_sc(context, index)
        band = render_caption(caption_lines(context, index), 512).shape[0]
        assert (sc.Rows, sc.Columns) == (512 + band, 512), f"source {index + 1}"
