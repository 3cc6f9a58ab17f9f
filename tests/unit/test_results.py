"""The SR and SC encoders: valid objects, stable UIDs, the right references, a safe caption."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
from datetime import datetime

import cv2
import highdicom as hd
import numpy as np
import pydicom
import pydicom.data
import pytest
from dciodvfy import dciodvfy
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from dicomai.inference.types import ClassScore, Code, ImagePrediction
from dicomai.ingest.spool import Spool
from dicomai.jobs.runner import _write_outputs
from dicomai.results import sc as sc_module
from dicomai.results.context import ModelIdentity, ResultContext, SourceImage
from dicomai.results.pmap import build_heatmap_pmap, supports_pmap
from dicomai.results.sc import blend_heatmap, build_sc, caption_lines, render_caption
from dicomai.results.sr import build_sr

PATIENT_NAME = "Müller^Jürgen"
PATIENT_ID = "PID-4711"
STUDY_UID = "1.2.826.0.1.3680043.8.498.1"
PNEUMOTHORAX = Code("36118008", "SCT", "Pneumothorax")
NORMAL = Code("17621005", "SCT", "Normal")
PROBABILITY = 0.8734
# Heat-map peak at model input resolution (128²): upper right quarter.
PEAK = (32, 96)
MODEL = ModelIdentity(
    name="chest-ptx",
    version="1.2.0",
    architecture="resnet50",
    weights_sha256="ab" * 32,
    explanation="gradcam++",
)
# When the reports of `make_context` were made: a caption shows it, and must not change
# between two renderings of one test.
CREATED = datetime(2026, 11, 25, 2, 4, 31)


def _synthetic_cr() -> Dataset:
    """A 256² MONOCHROME2 CR image with a bright blob in the lower left (away from the peak)."""
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # CR Image Storage
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.3"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.2"
    ds.Modality = "CR"
    ds.SeriesNumber = 3
    ds.InstanceNumber = 1
    ds.Rows = ds.Columns = 256
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    rows, columns = np.mgrid[:256, :256]
    blob = 3000 * np.exp(-((rows - 200) ** 2 + (columns - 50) ** 2) / 400)
    ds.PixelData = (200 + blob).astype(np.uint16).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def _one_patient_study(datasets: list[Dataset]) -> None:
    """Make the sample files one study of one patient with a non-ASCII name."""
    first = datasets[0]
    for ds in datasets:
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.PatientName = PATIENT_NAME
        ds.PatientID = PATIENT_ID
        ds.StudyInstanceUID = STUDY_UID
        for keyword in ("StudyDate", "StudyTime", "StudyID", "AccessionNumber"):
            setattr(ds, keyword, first.get(keyword, ""))


def _display(ds: Dataset) -> np.ndarray:
    pixels = ds.pixel_array.astype(np.float32)
    low, high = float(pixels.min()), float(pixels.max())
    return np.rint((pixels - low) / max(high - low, 1.0) * 255).astype(np.uint8)


def _heatmap() -> np.ndarray:
    rows, columns = np.mgrid[:128, :128]
    distance = (rows - PEAK[0]) ** 2 + (columns - PEAK[1]) ** 2
    return np.exp(-distance / 60.0).astype(np.float32)


def _evaluated(ds: Dataset, probability: float) -> ImagePrediction:
    return ImagePrediction(
        sop_instance_uid=ds.SOPInstanceUID,
        evaluated=True,
        scores=(
            ClassScore("pneumothorax", PNEUMOTHORAX, probability, 0.5, True),
            ClassScore("normal", NORMAL, 1 - probability, 0.5, False),
        ),
        predicted="pneumothorax" if probability >= 0.5 else "normal",
        explained="pneumothorax",
        heatmap=_heatmap(),
    )


@pytest.fixture
def context() -> ResultContext:
    """CT (positive), MR (not evaluated) and a synthetic CR (negative) of one study."""
    return make_context()


def make_context() -> ResultContext:
    """The `context` fixture's value, for the other results tests to build on."""
    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    mr = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    cr = _synthetic_cr()
    _one_patient_study([ct, mr, cr])
    predictions = (
        _evaluated(ct, PROBABILITY),
        ImagePrediction(mr.SOPInstanceUID, evaluated=False, reason="modality MR not supported"),
        _evaluated(cr, 0.1234),
    )
    return ResultContext(
        sources=tuple(SourceImage(ds, _display(ds)) for ds in (ct, mr, cr)),
        predictions=predictions,
        model=MODEL,
        input_digest="digest-1",
        created=CREATED,
    )


def _saved(ds: Dataset, tmp_path, name: str):
    path = tmp_path / name
    ds.save_as(path, enforce_file_format=True)
    ok, output = dciodvfy(path)
    assert ok, f"dciodvfy reports errors in {name}:\n{output}"
    return path


def _dsrdump(path) -> str:
    binary = shutil.which("dsrdump")
    if binary is None:
        pytest.fail("dsrdump not found: apt-get install -y dcmtk")
    result = subprocess.run([binary, str(path)], capture_output=True, check=False)
    assert result.returncode == 0, f"dsrdump cannot read the SR: {result.stderr!r}"
    return result.stdout.decode("utf-8", "replace")


def _referenced_uids(items) -> set[str]:
    uids = set()
    for item in items:
        for reference in item.get("ReferencedSOPSequence", []):
            uids.add(reference.ReferencedSOPInstanceUID)
        uids |= _referenced_uids(item.get("ContentSequence", []))
    return uids


def test_sr_is_valid_and_dsrdump_shows_findings(context, tmp_path):
    path = _saved(build_sr(context), tmp_path, "sr.dcm")

    dump = _dsrdump(path)

    assert "Pneumothorax" in dump
    assert f'"{PROBABILITY}"' in dump, "the probability is not in the SR"
    assert '(52101004,SCT,"Present")' in dump, "the positive CT finding is not Present"
    assert '(272519000,SCT,"Absent")' in dump, "the negative CR finding is not Absent"
    assert "chest-ptx" in dump and "architecture=resnet50" in dump
    assert "explanation=gradcam++" in dump, "the SR does not say how its heat maps were drawn"


def test_sr_says_which_image_was_not_evaluated_and_why(context, tmp_path):
    dump = _dsrdump(_saved(build_sr(context), tmp_path, "sr.dcm"))

    assert "image 2 not evaluated" in dump
    assert '(373121007,SCT,"Not Evaluated")' in dump
    assert '"modality MR not supported"' in dump


def test_sr_references_every_source(context):
    sr = build_sr(context)

    source_uids = {s.dataset.SOPInstanceUID for s in context.sources}
    evidence = {
        instance.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for instance in series.ReferencedSOPSequence
    }
    assert evidence == source_uids
    assert _referenced_uids(sr.ContentSequence) == source_uids


def test_sr_header_names_the_model_in_a_new_series(context):
    sr = build_sr(context)

    assert sr.Modality == "SR"
    assert sr.StudyInstanceUID == STUDY_UID
    assert sr.SeriesInstanceUID == context.uid("sr-series")
    assert sr.SOPInstanceUID == context.uid("sr")
    # chest-ptx's block of Series Numbers is 873: its first report's SR is 9001 + 8730.
    assert (sr.SeriesNumber, sr.InstanceNumber) == (17731, 1)
    assert sr.Manufacturer == "dicomai"
    assert sr.SeriesDescription == "AI findings (chest-ptx 1.2.0)"
    assert sr.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian


def test_uids_are_stable_and_follow_the_input(context):
    changed = dataclasses.replace(context, input_digest="digest-2")

    first, again, other = build_sr(context), build_sr(context), build_sr(changed)
    assert (first.SOPInstanceUID, first.SeriesInstanceUID) == (
        again.SOPInstanceUID,
        again.SeriesInstanceUID,
    )
    assert first.SOPInstanceUID != other.SOPInstanceUID
    assert first.SeriesInstanceUID != other.SeriesInstanceUID
    assert build_sc(context, 0).SOPInstanceUID == build_sc(context, 0).SOPInstanceUID
    assert build_sc(context, 0).SOPInstanceUID != build_sc(changed, 0).SOPInstanceUID
    assert build_sc(context, 0).SOPInstanceUID != build_sc(context, 2).SOPInstanceUID


def test_tracking_uids_follow_the_image_and_class_across_jobs_and_versions(context, tmp_path):
    # A resend's job (other input digest) and a later model version write new SRs; the same
    # image's same finding keeps its Tracking UID so that a reader can match them.
    later = dataclasses.replace(
        context, input_digest="digest-2", model=dataclasses.replace(MODEL, version="1.3.0")
    )
    other = dataclasses.replace(context, model=dataclasses.replace(MODEL, name="chest-other"))

    def tracked(ctx: ResultContext) -> dict[str, str]:
        report = hd.sr.Comprehensive3DSR.from_dataset(build_sr(ctx)).content
        groups = report.get_image_measurement_groups() + report.get_planar_roi_measurement_groups()
        return {str(g.tracking_identifier): g.tracking_uid for g in groups}

    first, again, elsewhere = tracked(context), tracked(later), tracked(other)
    assert build_sr(context).SOPInstanceUID != build_sr(later).SOPInstanceUID
    assert len(set(first.values())) == len(first) > 2
    assert again == first
    assert not set(elsewhere.values()) & set(first.values())


@pytest.mark.parametrize("index", [0, 2])
def test_sc_is_a_valid_derived_rgb_image(context, tmp_path, index):
    path = _saved(build_sc(context, index), tmp_path, f"sc{index}.dcm")
    sc = pydicom.dcmread(path)

    source = context.sources[index].dataset
    assert sc.PhotometricInterpretation == "RGB"
    assert list(sc.ImageType[:2]) == ["DERIVED", "SECONDARY"]
    assert sc.BurnedInAnnotation == "YES"
    assert sc.StudyInstanceUID == STUDY_UID
    assert sc.SeriesInstanceUID == context.uid("sc-series")
    assert sc.SOPInstanceUID == context.uid("sc", source.SOPInstanceUID)
    assert (sc.SeriesNumber, sc.InstanceNumber) == (17732, index + 1)
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert "not for primary diagnosis" in sc.SeriesDescription
    assert len(sc.SeriesDescription) <= 64
    # MODEL's heat maps are Grad-CAM++'s: the header must not claim Grad-CAM's.
    assert sc.DerivationDescription.startswith("Grad-CAM++ heat map ("), sc.DerivationDescription
    assert sc.DerivationDescription.endswith("chest-ptx 1.2.0 - report #1, 2026-11-25 02:04")


@pytest.mark.parametrize("index", [0, 2])
def test_sc_is_the_image_with_a_caption_band_below(context, index):
    sc = build_sc(context, index)

    # Sources of 128² and 256² are scaled up to 512² so that the caption can be read.
    band = render_caption(caption_lines(context, index), 512)
    assert sc.pixel_array.shape == (512 + band.shape[0], 512, 3)
    assert np.array_equal(sc.pixel_array[512:], band)


def _redness(pixels: np.ndarray) -> np.ndarray:
    return pixels[..., 0] - (pixels[..., 1] + pixels[..., 2]) // 2


def test_sc_hottest_region_is_at_the_heatmap_peak(context):
    pixels = build_sc(context, 0).pixel_array[:512].astype(np.int32)

    # JET is dark red at 1.0 and bright red just below: the red region is a disc around the
    # peak, so compare its centre, not its reddest pixel.
    redness = _redness(pixels)
    rows, columns = np.nonzero(redness > 0.8 * redness.max())
    centre = (rows.mean(), columns.mean())
    expected = ((PEAK[0] + 0.5) * 4 - 0.5, (PEAK[1] + 0.5) * 4 - 0.5)  # 128² -> 512²
    assert np.allclose(centre, expected, atol=4), (
        f"red region centred at {centre}, heat-map peak at {expected}"
    )


def test_confident_negative_shows_a_faint_map_only(context):
    positive = _redness(build_sc(context, 0).pixel_array[:512].astype(np.int32)).max()
    negative = _redness(build_sc(context, 2).pixel_array[:512].astype(np.int32)).max()
    assert negative < 0.25 * positive, "a confident negative is drawn as strongly as a finding"


def test_large_sources_are_scaled_down_to_1024(context):
    source = context.sources[2]
    large = np.zeros((2048, 1536), dtype=np.uint8)
    sources = (*context.sources[:2], dataclasses.replace(source, display=large))

    sc = build_sc(dataclasses.replace(context, sources=sources), 2)

    band = render_caption(caption_lines(context, 2), 768)
    assert (sc.Rows, sc.Columns) == (1024 + band.shape[0], 768)


def drawn_captions(context: ResultContext, monkeypatch) -> list[str]:
    """The text `build_sc` draws on the first overlay of `context`."""
    drawn: list[str] = []
    real_put_text = cv2.putText

    def recording_put_text(image, text, *args, **kwargs):
        drawn.append(text)
        return real_put_text(image, text, *args, **kwargs)

    monkeypatch.setattr(sc_module.cv2, "putText", recording_put_text)
    build_sc(context, 0)
    monkeypatch.setattr(sc_module.cv2, "putText", real_put_text)
    return drawn


def test_caption_has_finding_model_and_warning_but_no_patient_data(context, monkeypatch):
    drawn = drawn_captions(context, monkeypatch)

    assert drawn == [
        "Pneumothorax: 87%",
        "chest-ptx 1.2.0",
        "report #1, 2026-11-25 02:04",
        "AI generated - not for primary diagnosis",
    ]
    for text in drawn:
        for private in ("Müller", "Jürgen", "Muller", "Jurgen", PATIENT_ID):
            assert private not in text, f"patient data {private!r} burned into the caption"


def test_non_ascii_patient_name_is_copied_exactly(context, tmp_path):
    for name, built in (("sr.dcm", build_sr(context)), ("sc.dcm", build_sc(context, 0))):
        read = pydicom.dcmread(_saved(built, tmp_path, name))
        assert read.SpecificCharacterSet == "ISO_IR 192", name
        assert str(read.PatientName) == PATIENT_NAME, name
        assert read.PatientID == PATIENT_ID, name


def test_a_class_named_outside_the_sources_character_set_makes_the_sr_utf8(context, tmp_path):
    # A class named in Chinese came out "LÄSION_??" in the SR of a Latin-1 source.
    for source in context.sources:
        source.dataset.SpecificCharacterSet = "ISO_IR 100"
        source.dataset.PatientName = "Müller^Jürgen"
    lesion = Code("L_SION____0210", "99DICOMAI", "läsion_结节")
    predictions = tuple(
        dataclasses.replace(
            p,
            scores=tuple(dataclasses.replace(s, name="läsion_结节", code=lesion) for s in p.scores),
        )
        for p in context.predictions
    )
    built = build_sr(dataclasses.replace(context, predictions=predictions))
    read = pydicom.dcmread(_saved(built, tmp_path, "sr.dcm"))
    assert read.SpecificCharacterSet == "ISO_IR 192"
    assert str(read.PatientName) == "Müller^Jürgen"
    report = hd.sr.Comprehensive3DSR.from_dataset(read).content
    groups = report.get_image_measurement_groups() + report.get_planar_roi_measurement_groups()
    found = {g.finding_type.meaning for g in groups if g.finding_type is not None}
    assert found == {"läsion_结节"}


def test_a_present_finding_whose_map_is_all_zeros_still_gets_its_report(context, tmp_path):
    # A map of zeros had no hot spot to outline: the whole study's SR failed.
    positive = context.predictions[0]
    assert positive.top_finding is not None and positive.top_finding.positive
    assert positive.heatmap is not None
    zeroed = dataclasses.replace(positive, heatmap=np.zeros_like(positive.heatmap))
    built = build_sr(dataclasses.replace(context, predictions=(zeroed, *context.predictions[1:])))
    report = hd.sr.Comprehensive3DSR.from_dataset(
        pydicom.dcmread(_saved(built, tmp_path, "sr.dcm"))
    ).content
    assert report.get_planar_roi_measurement_groups() == []
    findings = [g for g in report.get_image_measurement_groups() if g.finding_type is not None]
    assert {g.finding_type.meaning for g in findings} >= {positive.top_finding.code.meaning}


@pytest.mark.parametrize(
    ("probability", "in_sr", "on_overlay"),
    [
        (0.49996, 0.4999, "49%"),
        (0.4951, 0.4951, "49%"),
        (0.5, 0.5, "50%"),
        (0.73456, 0.7346, "73%"),
    ],
)
def test_a_probability_is_shown_on_the_side_of_the_threshold_that_decided_it(
    context, probability: float, in_sr: float, on_overlay: str
) -> None:
    # An Absent 0.49996 (threshold 0.5) read 0.5 in the SR and "50%" on its overlay.
    ct = context.sources[0].dataset
    predictions = (_evaluated(ct, probability), *context.predictions[1:])
    changed = dataclasses.replace(context, predictions=predictions)
    report = hd.sr.Comprehensive3DSR.from_dataset(build_sr(changed)).content
    groups = report.get_image_measurement_groups() + report.get_planar_roi_measurement_groups()
    values = [
        float(m.value)
        for g in groups
        if g.finding_type is not None and g.finding_type.meaning == PNEUMOTHORAX.meaning
        for m in g.get_measurements()
    ]
    assert in_sr in values, values
    assert caption_lines(changed, 0)[0].endswith(f": {on_overlay}")


def test_iso_2022_names_with_an_empty_first_character_set_are_copied(context, tmp_path):
    # The usual Japanese and Korean encodings: ['', 'ISO 2022 IR 87'] and ['', '... IR 149'].
    charsets = os.path.join(os.path.dirname(pydicom.data.__file__), "charset_files")
    for name in ("chrH31.dcm", "chrI2.dcm"):
        encoded = pydicom.dcmread(os.path.join(charsets, name))
        for source in context.sources:
            source.dataset.SpecificCharacterSet = encoded.SpecificCharacterSet
            source.dataset.PatientName = encoded.PatientName
        for kind, built in (("sr", build_sr(context)), ("sc", build_sc(context, 0))):
            read = pydicom.dcmread(_saved(built, tmp_path, f"{kind}-{name}"))
            assert str(read.PatientName) == str(encoded.PatientName), (kind, name)
    # Japanese is written as the source has it; Korean, whose ISO 2022 set highdicom does not
    # know, in UTF-8 (the name's characters are what the test above compares).
    assert read.SpecificCharacterSet == "ISO_IR 192"
    japanese = pydicom.dcmread(tmp_path / "sr-chrH31.dcm")
    assert japanese.SpecificCharacterSet == ["ISO 2022 IR 6", "ISO 2022 IR 87"]


@pytest.mark.parametrize(
    ("sop_class", "frame"),
    [
        # SC_rgb_rle_2frame is a single-frame IOD that says Number of Frames 2: no frame.
        ("1.2.840.10008.5.1.4.1.1.7", None),
        ("1.2.840.10008.5.1.4.1.1.7.4", 1),  # Multi-frame True Color SC: frame 1
    ],
)
def test_a_frame_is_referenced_only_in_a_multi_frame_iod(context, tmp_path, sop_class, frame):
    two_frames = pydicom.dcmread(get_testdata_file("SC_rgb_rle_2frame.dcm"))
    two_frames.SOPClassUID = sop_class
    _one_patient_study([two_frames])
    display = np.zeros((two_frames.Rows, two_frames.Columns), np.uint8)
    context = dataclasses.replace(
        context,
        sources=(SourceImage(two_frames, display),),
        predictions=(_evaluated(two_frames, PROBABILITY),),
    )
    sr, sc = build_sr(context), build_sc(context, 0)
    if frame is None:  # a valid reference to a valid SOP class: both objects pass dciodvfy
        _saved(sr, tmp_path, "sr.dcm")
        _saved(sc, tmp_path, "sc.dcm")
    (source,) = sc.SourceImageSequence
    assert source.get("ReferencedFrameNumber") == frame
    in_sr = [e.value for e in sr.iterall() if e.keyword == "ReferencedFrameNumber"]
    assert in_sr == ([] if frame is None else [frame] * len(in_sr))
    assert frame is None or in_sr, "the SR names no frame of a multi-frame source"


def test_no_overlay_for_an_image_that_was_not_evaluated(context):
    with pytest.raises(ValueError, match="not evaluated"):
        build_sc(context, 1)


def test_blend_keeps_cold_pixels_and_colours_hot_ones():
    display = np.full((200, 300), 100, dtype=np.uint8)
    heatmap = np.zeros((10, 10), dtype=np.float32)
    heatmap[2, 7] = 1.0

    blended = blend_heatmap(display, heatmap)

    assert blended.shape == (200, 300, 3) and blended.dtype == np.uint8
    assert (blended[190, 10] == 100).all(), "a cold pixel changed"
    red, green, blue = blended[50, 225].astype(int)
    assert red > green and red > blue, "the hottest pixel is not red"


def test_sr_from_a_source_without_optional_header_data(context, tmp_path):
    # The synthetic CR has no birth date, sex or referring physician (Type 2), and no
    # ImagerPixelSpacing (Type 3 in CR) for the image library's descriptors.
    order = (2, 0, 1)
    reordered = dataclasses.replace(
        context,
        sources=tuple(context.sources[i] for i in order),
        predictions=tuple(context.predictions[i] for i in order),
    )

    read = pydicom.dcmread(_saved(build_sr(reordered), tmp_path, "sr.dcm"))

    assert read.PatientBirthDate == "" and read.PatientSex == ""
    assert str(read.PatientName) == PATIENT_NAME


def test_long_model_names_are_cut_but_the_warning_is_kept(context):
    model = dataclasses.replace(MODEL, name="a-very-long-model-name-for-chest-radiographs-v2")
    context = dataclasses.replace(context, model=model)

    sr, sc = build_sr(context), build_sc(context, 0)

    assert len(sr.SeriesDescription) <= 64 and sr.SeriesDescription.startswith("AI findings (")
    assert len(sc.SeriesDescription) <= 64
    assert sc.SeriesDescription.endswith(") - not for primary diagnosis")
    # The name is cut, never the version: two versions stay apart in the series list; a hash
    # of the whole name follows the cut, for two names with the same head.
    for built in (sr, sc, build_heatmap_pmap(context, 0)):
        assert f"~db51 {MODEL.version})" in built.SeriesDescription, built.SeriesDescription
        assert len(built.SeriesDescription) <= 64


def test_a_short_model_label_is_shown_whole(context):
    sc = build_sc(context, 0)
    assert sc.SeriesDescription == (
        f"AI heat map ({MODEL.name} {MODEL.version}) - not for primary diagnosis"
    )


def test_a_jobs_objects_are_written_whole_and_private_under_their_uids(context, tmp_path):
    sr, sc = build_sr(context), build_sc(context, 0)
    spool = Spool(tmp_path / "outputs")

    outputs = _write_outputs(spool, STUDY_UID, [("sr", sr), ("sc", sc)])

    assert [(o.kind, o.path) for o in outputs] == [
        ("sr", f"{STUDY_UID}/{sr.SOPInstanceUID}.dcm"),
        ("sc", f"{STUDY_UID}/{sc.SOPInstanceUID}.dcm"),
    ]
    for output in outputs:
        path = spool.path(output.path)
        assert path.stat().st_mode & 0o777 == 0o600, f"{output.kind} is readable by others"
        read = pydicom.dcmread(path)
        assert read.SOPInstanceUID == output.dataset.SOPInstanceUID
        assert read.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert sorted(p.name for p in spool.path(STUDY_UID).iterdir()) == sorted(
        f"{o.dataset.SOPInstanceUID}.dcm" for o in outputs
    ), "a temporary file was left behind"


@pytest.mark.parametrize("keyword", ["SliceThickness", "PixelSpacing", "ImagePositionPatient"])
def test_a_parametric_map_is_made_only_for_a_source_with_the_geometry_it_copies(context, keyword):
    assert supports_pmap(context, 0)  # the CT
    ct = context.sources[0].dataset
    if keyword == "PixelSpacing":
        ct.PixelSpacing = [0.5]
    else:
        del ct[keyword]
    assert not supports_pmap(context, 0)


def test_a_narrow_source_gets_margins_so_that_its_caption_can_be_read() -> None:
    tall = np.full((3000, 400), 128, dtype=np.uint8)  # a long-leg film, say
    lines = ("Nodule: 87%", "chest-ptx 1.2.0", "not for primary diagnosis")
    pixels = sc_module.render_overlay(tall, _heatmap(), lines)
    assert pixels.shape[1] == sc_module.MIN_CAPTION_WIDTH
    band = render_caption(lines, sc_module.MIN_CAPTION_WIDTH)
    assert np.array_equal(pixels[-band.shape[0] :], band)
    assert band.shape[0] >= 3 * 12, "three lines of at least 12 pixels"
