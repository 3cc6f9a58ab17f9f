"""DICOM to model input: decoding, LUTs, MONOCHROME1, equalisation and the input spec."""

from __future__ import annotations

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import apply_voi_lut
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid

from dicomai.errors import ModelPackageError, NotEvaluable
from dicomai.imaging.decode import frame_count, pixel_frames, read_instance
from dicomai.imaging.preprocess import (
    lut_attributes,
    modality_values,
    prepare,
    render,
    selected_frames,
    to_display,
    to_model_input,
)
from dicomai.imaging.spec import InputSpec

PATIENT_NAME = "Doe^Jane"
PATIENT_ID = "PID-4711"

# Only files that ship inside pydicom's wheel: asking get_testdata_file for any other name
# makes it try to download for ~21 s per retry (FACTS.md).
COMPRESSED_AND_COLOUR = [
    "JPEG2000.dcm",  # JPEG 2000, signed 16-bit NM
    "693_J2KI.dcm",  # JPEG 2000 lossy CT with window and rescale
    "MR_small_RLE.dcm",
    "MR_small_jp2klossless.dcm",
    "MR_small_jpeg_ls_lossless.dcm",
    "JPEGLSNearLossless_16.dcm",
    "JPGExtended.dcm",  # JPEG Extended 12-bit
    "SC_rgb_jpeg_dcmtk.dcm",  # JPEG baseline, YBR_FULL
    "SC_rgb_rle.dcm",
    "SC_rgb_rle_2frame.dcm",
    "SC_ybr_full_422_uncompressed.dcm",
    "SC_rgb_jls_lossy_line.dcm",
    "examples_jpeg2k.dcm",  # JPEG 2000 lossless, YBR_RCT
    "examples_palette.dcm",  # PALETTE COLOR
]


def sample(name: str) -> pydicom.Dataset:
    path = get_testdata_file(name, download=False)
    assert path is not None, f"pydicom no longer ships {name}"
    return read_instance(path)


def synthetic(
    pixels: np.ndarray,
    photometric: str = "MONOCHROME2",
    **attributes: object,
) -> Dataset:
    """A single-frame unsigned 16-bit secondary capture with a patient, as a PACS sends it."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = generate_uid()
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.Modality = "OT"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.astype("<u2").tobytes()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def ramp(rows: int = 32, cols: int = 32, top: int = 1000) -> np.ndarray:
    return np.linspace(0, top, rows * cols).reshape(rows, cols).round().astype(np.uint16)


def assert_not_evaluable_without_phi(ds: Dataset) -> str:
    with pytest.raises(NotEvaluable) as caught:
        prepare(ds, InputSpec())
    reason = str(caught.value)
    assert reason, "NotEvaluable must say why"
    assert PATIENT_NAME not in reason and PATIENT_ID not in reason, reason
    return reason


# --- modality LUT and VOI ---------------------------------------------------------------


def test_ct_rescale_gives_hounsfield_units() -> None:
    ds = sample("CT_small.dcm")
    stored = ds.pixel_array
    hu = modality_values(ds)
    assert np.array_equal(hu, stored * 1.0 - 1024.0), "Rescale Slope/Intercept not applied"
    assert hu.min() >= -1100 and hu.max() <= 3100, f"implausible HU range {hu.min()}..{hu.max()}"


def test_ct_without_window_uses_central_percentiles() -> None:
    ds = sample("CT_small.dcm")
    assert "WindowCenter" not in ds and "VOILUTSequence" not in ds
    image = render(ds)
    assert image.dtype == np.float32 and image.shape == (128, 128)
    saturated = float(np.mean(image == 1.0))
    assert 0 < saturated <= 0.01, f"{saturated:.3%} of pixels white; expected the top 0.5%"
    assert image.min() == 0.0


def test_mr_window_from_header_is_used() -> None:
    ds = sample("MR_small.dcm")
    center, width = float(ds.WindowCenter), float(ds.WindowWidth)
    values = ds.pixel_array.astype(np.float64)
    # PS3.3 C.11.2.1.2.1, LINEAR
    expected = np.clip((values - (center - 0.5)) / (width - 1) + 0.5, 0, 1)
    assert np.allclose(render(ds), expected, atol=1e-4)
    minmax = (values - values.min()) / (values.max() - values.min())
    assert not np.allclose(render(ds), minmax, atol=0.05), "window ignored, min-max used"


@pytest.mark.parametrize(
    ("center", "width", "function"),
    [
        (500, 200, None),
        (500.5, 2, "LINEAR"),
        (0, 1, None),  # width 1: a threshold, left to pydicom
        ([300, 700], [100, 400], None),  # the first window is the default
        (-200, 3001, None),
        (500, 200, "LINEAR_EXACT"),
        (500, 200, "SIGMOID"),
    ],
)
def test_window_renders_as_pydicom_computes_it(
    center: object, width: object, function: str | None
) -> None:
    extra = {"VOILUTFunction": function} if function else {}
    ds = synthetic(
        ramp(top=1000),
        WindowCenter=center,
        WindowWidth=width,
        RescaleSlope=1.5,
        RescaleIntercept=-450,
        **extra,
    )
    view = Dataset()
    view.PhotometricInterpretation, view.BitsStored, view.PixelRepresentation = "MONOCHROME2", 16, 0
    view.WindowCenter, view.WindowWidth = center, width
    if function:
        view.VOILUTFunction = function
    hu = ds.pixel_array * 1.5 - 450
    expected = apply_voi_lut(hu, view, index=0) / 65535.0
    assert np.allclose(render(ds), expected, atol=1e-6)


def test_voi_lut_sequence_takes_precedence_and_uses_depth_of_entries() -> None:
    pixels = np.arange(256, dtype=np.uint16).reshape(16, 16)
    item = Dataset()
    item.LUTDescriptor = [256, 0, 16]  # declares 16 bits; entries use 12
    item.LUTData = [(255 - i) * 16 for i in range(256)]
    ds = synthetic(pixels, VOILUTSequence=Sequence([item]), WindowCenter=10, WindowWidth=5)
    image = render(ds)
    assert np.allclose(image, (255 - pixels) * 16 / 4095.0, atol=1e-6)


def test_invalid_window_is_ignored_like_a_viewer_would() -> None:
    ds = synthetic(ramp(), WindowCenter=500, WindowWidth=0)
    image = render(ds)
    assert image.min() == 0.0 and image.max() == 1.0


def test_monochrome1_displays_minimum_as_white() -> None:
    pixels = ramp()
    pixels[0, 0] = 0
    pixels[-1, -1] = 1000
    mono1 = render(synthetic(pixels, "MONOCHROME1"))
    mono2 = render(synthetic(pixels, "MONOCHROME2"))
    display = to_display(mono1)
    assert display[0, 0] == 255 and display[-1, -1] == 0, "MONOCHROME1 not inverted"
    assert mono2[0, 0] == 0.0 and mono2[-1, -1] == 1.0
    assert np.allclose(mono1, 1.0 - mono2)


def test_monochrome1_is_inverted_after_the_window() -> None:
    ds = synthetic(ramp(), "MONOCHROME1", WindowCenter=500, WindowWidth=200)
    image = render(ds)
    assert image[0, 0] == 1.0 and image[-1, -1] == 0.0


def test_functional_groups_give_each_frame_its_rescale_and_window() -> None:
    frames = np.stack([ramp(), ramp()])
    ds = synthetic(frames[0], NumberOfFrames=2)
    ds.PixelData = frames.astype("<u2").tobytes()
    rescale = Dataset()
    rescale.RescaleSlope, rescale.RescaleIntercept, rescale.RescaleType = 2, -100, "US"
    shared = Dataset()
    shared.PixelValueTransformationSequence = Sequence([rescale])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per_frame = []
    for center in (400, 1600):
        voi = Dataset()
        voi.WindowCenter, voi.WindowWidth = center, 400
        group = Dataset()
        group.FrameVOILUTSequence = Sequence([voi])
        per_frame.append(group)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)

    assert np.array_equal(modality_values(ds, 1), frames[1] * 2.0 - 100)
    assert float(lut_attributes(ds, 1).WindowCenter) == 1600
    assert render(ds, 0).mean() > render(ds, 1).mean(), "per-frame window not applied"


def test_a_blank_image_renders_as_zeros_and_is_not_evaluated() -> None:
    # A radiologist reviewer's case: a uniform image came back "Nodule Absent, 0 %".
    ds = synthetic(np.full((20, 30), 700, dtype=np.uint16))
    image = render(ds)
    assert not image.any() and np.isfinite(image).all()
    with pytest.raises(NotEvaluable, match="blank"):
        prepare(ds, InputSpec(equalize="clahe"))
    rgb = pydicom.dcmread(get_testdata_file("SC_rgb_rle.dcm"))
    rgb.PixelData = np.full((rgb.Rows, rgb.Columns, 3), (200, 40, 40), np.uint8).tobytes()
    rgb.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    with pytest.raises(NotEvaluable, match="blank"):
        prepare(rgb, InputSpec(color="rgb"))


# --- decoding ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", COMPRESSED_AND_COLOUR)
def test_sample_decodes_to_finite_model_input(name: str) -> None:
    ds = sample(name)
    display, model_input = prepare(ds, InputSpec(size=(128, 96)))
    assert display.dtype == np.uint8 and display.shape == (ds.Rows, ds.Columns)
    assert model_input.dtype == np.float32 and model_input.shape == (3, 128, 96)
    assert np.isfinite(model_input).all()
    assert display.max() > display.min(), f"{name} rendered as a flat image"


@pytest.mark.parametrize(
    "name", ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm"]
)
def test_lossless_codecs_return_the_stored_values(name: str) -> None:
    reference = pixel_frames(sample("MR_small.dcm"))
    assert np.array_equal(pixel_frames(sample(name)), reference)


def test_pixel_frames_shapes() -> None:
    assert pixel_frames(sample("MR_small.dcm")).shape == (1, 64, 64)
    colour = sample("SC_rgb_rle_2frame.dcm")
    assert frame_count(colour) == 2
    assert pixel_frames(colour).shape == (2, 100, 100, 3)
    assert pixel_frames(colour, index=1).shape == (1, 100, 100, 3)


def test_ybr_is_converted_to_rgb_before_luminance() -> None:
    from_rgb = render(sample("SC_rgb_rle.dcm"))
    from_ybr = render(sample("SC_ybr_full_422_uncompressed.dcm"))
    from_jpeg_ybr = render(sample("SC_rgb_jpeg_dcmtk.dcm"))
    assert np.abs(from_ybr - from_rgb).mean() < 0.02
    assert np.abs(from_jpeg_ybr - from_rgb).mean() < 0.02


def test_colour_becomes_luminance() -> None:
    ds = sample("SC_rgb_rle.dcm")
    expected = cv2.cvtColor(ds.pixel_array, cv2.COLOR_RGB2GRAY) / 255.0
    assert np.allclose(render(ds), expected, atol=1 / 255)


def test_selected_frames_follow_the_spec() -> None:
    ds = sample("SC_rgb_rle_2frame.dcm")
    assert selected_frames(ds, InputSpec()) == [0]
    assert selected_frames(ds, InputSpec(frames="all")) == [0, 1]
    _, second = prepare(ds, InputSpec(), frame=1)
    assert second.shape == (3, 224, 224)


def test_missing_pixel_data_is_not_evaluable() -> None:
    ds = synthetic(ramp())
    del ds.PixelData
    assert "pixel data" in assert_not_evaluable_without_phi(ds)


def test_short_pixel_data_is_not_evaluable() -> None:
    ds = synthetic(ramp())
    ds.PixelData = ds.PixelData[:100]
    assert "bytes" in assert_not_evaluable_without_phi(ds)


def test_truncated_sample_file_is_not_evaluable() -> None:
    with pytest.raises(NotEvaluable):
        render(sample("MR_truncated.dcm"))


def test_absurd_dimensions_are_refused_before_decoding() -> None:
    ds = synthetic(ramp())
    ds.Rows = 60000
    assert "16384" in assert_not_evaluable_without_phi(ds)
    ds = synthetic(ramp(), NumberOfFrames=10**6)
    ds.Rows = ds.Columns = 16000
    assert_not_evaluable_without_phi(ds)


def test_unsupported_transfer_syntax_is_not_evaluable() -> None:
    ds = synthetic(ramp())
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2 video
    ds.PixelData = encapsulate([b"\x00" * 64])
    assert "1.2.840.10008.1.2.4.100" in assert_not_evaluable_without_phi(ds)


def test_corrupt_compressed_data_is_not_evaluable() -> None:
    ds = synthetic(ramp())
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.PixelData = encapsulate([b"\xff\xd8" + b"\x17" * 500])
    assert "decoded" in assert_not_evaluable_without_phi(ds)


def test_missing_frame_is_not_evaluable() -> None:
    with pytest.raises(NotEvaluable, match="frame 3"):
        render(sample("MR_small.dcm"), frame=3)


def test_non_dicom_file_is_not_evaluable(tmp_path) -> None:
    path = tmp_path / "notes.dcm"
    path.write_text("not an image")
    with pytest.raises(NotEvaluable, match="not a DICOM file"):
        read_instance(path)


# --- model input -------------------------------------------------------------------------


def test_model_input_is_normalised_with_the_spec() -> None:
    image = np.full((50, 80), 0.5, dtype=np.float32)
    spec = InputSpec(size=(20, 30), mean=(0.5, 0.25, 0.0), std=(1.0, 0.5, 0.25))
    model_input = to_model_input(image, spec)
    assert model_input.shape == (3, 20, 30)
    assert np.allclose(model_input[0], 0.0)
    assert np.allclose(model_input[1], 0.5)
    assert np.allclose(model_input[2], 2.0)


@pytest.mark.parametrize("equalize", ["hist", "clahe"])
def test_equalisation_changes_the_input_and_keeps_its_shape(equalize: str) -> None:
    image = render(sample("CT_small.dcm"))
    plain = to_model_input(image, InputSpec())
    equalized = to_model_input(image, InputSpec(equalize=equalize))
    assert equalized.shape == plain.shape == (3, 224, 224)
    assert np.isfinite(equalized).all()
    assert not np.allclose(equalized, plain, atol=0.05), f"{equalize} had no effect"


def test_clahe_clip_limit_matters() -> None:
    image = render(sample("CT_small.dcm"))
    gentle = to_model_input(image, InputSpec(equalize="clahe", clahe_clip=1.0))
    strong = to_model_input(image, InputSpec(equalize="clahe", clahe_clip=8.0))
    assert not np.allclose(gentle, strong)


# --- InputSpec ---------------------------------------------------------------------------


def test_spec_defaults_and_round_trip() -> None:
    spec = InputSpec.from_dict({})
    assert spec.size == (224, 224) and spec.equalize == "none" and spec.frames == "first"
    custom = InputSpec.from_dict({"size": [512, 384], "equalize": "clahe", "clahe_clip": 3})
    assert custom.size == (512, 384) and custom.clahe_clip == 3.0
    assert InputSpec.from_dict(custom.to_dict()) == custom
    assert custom.to_dict()["equalize"] == "clahe"


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"equalize": "gamma"}, "equalize"),
        ({"equalize": ["hist"]}, "equalize"),
        ({"size": [224]}, "size"),
        ({"size": [224, 224, 3]}, "size"),
        ({"size": [0, 224]}, "size"),
        ({"size": [224.0, 224]}, "size"),
        ({"size": "224"}, "size"),
        ({"mean": [0.5, 0.5]}, "mean"),
        ({"std": [0.2, 0.0, 0.2]}, "std"),
        ({"std": [0.2, float("nan"), 0.2]}, "std"),
        ({"clahe_clip": 0}, "clahe_clip"),
        ({"clahe_clip": True}, "clahe_clip"),
        ({"frames": "middle"}, "frames"),
        ({"equalise": "hist"}, "equalise"),
    ],
)
def test_spec_rejects_bad_values(options: dict, field: str) -> None:
    with pytest.raises(ModelPackageError, match=field):
        InputSpec.from_dict(options)


def test_jpeg_ls_prefers_pyjpegls_and_falls_back(monkeypatch) -> None:
    import dicomai.imaging.decode as decode

    real = decode.pixel_array
    plugins: list[str] = []

    def flaky_pyjpegls(ds, *, index, decoding_plugin):
        plugins.append(decoding_plugin)
        if decoding_plugin == "pyjpegls":
            raise RuntimeError("CharLS rejected the stream")
        return real(ds, index=index, decoding_plugin=decoding_plugin)

    monkeypatch.setattr(decode, "pixel_array", flaky_pyjpegls)
    frames = pixel_frames(sample("MR_small_jpeg_ls_lossless.dcm"))
    assert plugins[:2] == ["pyjpegls", "pylibjpeg"], "JPEG-LS should try pyjpegls (4x faster) first"
    assert np.array_equal(frames, pixel_frames(sample("MR_small.dcm")))


@pytest.mark.parametrize(
    "name",
    [
        "MR_small_jp2klossless.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "JPEG2000.dcm",
        "SC_rgb_jpeg_dcmtk.dcm",
    ],
)
def test_gdcm_decodes_where_it_is_the_only_decoder_installed(monkeypatch, name: str) -> None:
    from pydicom.pixels import get_decoder

    ds = sample(name)
    expected = pixel_frames(ds)
    decoder = get_decoder(ds.file_meta.TransferSyntaxUID)
    assert "gdcm" in decoder.available_plugins, "python-gdcm is the decoder of last resort"
    for plugin in decoder.available_plugins:
        if plugin != "gdcm":
            monkeypatch.delitem(decoder._available, plugin)
    frames = pixel_frames(ds)
    assert frames.shape == expected.shape
    # Lossy JPEG decoders may round differently by one; lossless ones agree exactly.
    assert np.abs(frames.astype(int) - expected.astype(int)).max() <= 1


def test_gdcm_is_not_tried_where_another_decoder_is_installed(monkeypatch) -> None:
    # GDCM aborts the whole process (an uncaught C++ exception) on some streams the other
    # decoders refuse: the worker and every study of its batch went with it.
    from pydicom.pixels import get_decoder

    ds = sample("MR_small_jpeg_ls_lossless.dcm")
    decoder = get_decoder(ds.file_meta.TransferSyntaxUID)
    tried: list[str] = []

    def refuse_as(plugin: str):
        def refuse(*args, **kwargs):
            tried.append(plugin)
            raise RuntimeError("this plugin cannot decode the stream")

        return refuse

    for plugin in decoder.available_plugins:
        monkeypatch.setitem(decoder._available, plugin, refuse_as(plugin))
    with pytest.raises(NotEvaluable, match="could not be decoded"):
        pixel_frames(ds)
    assert tried and "gdcm" not in tried, f"decoders tried: {tried}"


def jpeg_ls_with_header(tmp_path, **header: object):
    """A 12-bit JPEG-LS CR whose header then says other dimensions than its codestream, as a
    router or an anonymiser leaves it."""
    from pydicom.uid import JPEGLSLossless

    ds = synthetic(np.tile(np.arange(128, dtype=np.uint16) * 32, (128, 1)))
    ds.BitsStored, ds.HighBit = 12, 11
    ds.compress(JPEGLSLossless)
    for keyword, value in header.items():
        setattr(ds, keyword, value)
    path = tmp_path / "mismatch.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_a_codestream_with_more_columns_than_its_header_is_not_evaluated(tmp_path) -> None:
    # Columns 64 against a stream of 128: GDCM returned half-row strips, evaluated as an image.
    ds = read_instance(jpeg_ls_with_header(tmp_path, Columns=64))
    reason = assert_not_evaluable_without_phi(ds)
    assert "do not match their dimensions" in reason and "128x128x1" in reason, reason


@pytest.mark.parametrize(
    "header",
    [
        {"Columns": 256},
        {"Rows": 256},
        {"Rows": 64},
        {"SamplesPerPixel": 3, "PhotometricInterpretation": "RGB", "PlanarConfiguration": 0},
    ],
)
def test_a_codestream_unlike_its_header_does_not_kill_the_worker(tmp_path, header: dict) -> None:
    # GDCM threw a C++ exception nothing catches: the process aborted (SIGABRT) with every
    # study of its batch. In a child process, so that a regression fails this test only.
    import subprocess
    import sys

    path = jpeg_ls_with_header(tmp_path, **header)
    child = (
        "import sys\n"
        "from dicomai.imaging.spec import InputSpec\n"
        "from dicomai.jobs.reading import read_image\n"
        "print(read_image('1.2.3', sys.argv[1], InputSpec(size=(32, 32))).reason)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", child, str(path)], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, f"the reading process died: {done.returncode} {done.stderr[-300:]}"
    assert "do not match their dimensions" in done.stdout, done.stdout


@pytest.mark.parametrize(
    ("rows", "cols", "evaluable"), [(8, 8, False), (1, 300, False), (16, 16, True)]
)
def test_an_image_far_smaller_than_the_model_input_is_not_evaluated(
    rows: int, cols: int, evaluable: bool
) -> None:
    ds = Dataset()
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.arange(rows * cols, dtype=np.uint8).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    spec = InputSpec(size=(128, 128))
    if evaluable:
        assert prepare(ds, spec)[1].shape == (3, 128, 128)
    else:
        with pytest.raises(NotEvaluable, match="image too small for the model"):
            prepare(ds, spec)
