"""Property-based fuzzing of what a sender controls: every case ends in a clear status (or
NotEvaluable in preprocessing), never an unexpected exception, and the listener stays up."""

from __future__ import annotations

import tomllib
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from daemon import Listener
from faultkit import AET, SENDER
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)
from pynetdicom import AE, _config
from servers import echoscu, sample_file

from dicomai.errors import InvalidInstance, NotEvaluable
from dicomai.imaging.preprocess import prepare
from dicomai.imaging.spec import InputSpec
from dicomai.ingest.header import Header, encode_file_meta, read_header

CT = "1.2.840.10008.5.1.4.1.1.2"
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
DEMO_SPEC = InputSpec.from_dict(
    tomllib.loads((Path(__file__).parents[2] / "models/demo-chest-nodule/model.toml").read_text())[
        "input"
    ]
)
FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


def ct_bytes() -> bytes:
    """CT_small's dataset (no file meta) in explicit VR little endian."""
    ds = pydicom.dcmread(sample_file("CT_small.dcm"))
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()[len(encode_file_meta(ds.file_meta)) :]


CT_DATASET = ct_bytes()
CT_SOP_UID = str(pydicom.dcmread(sample_file("CT_small.dcm")).SOPInstanceUID)


def meta_for(syntax: str, sop_uid: str = "1.2.3.4") -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = syntax
    meta.ImplementationClassUID = "1.2.3.4.5"
    return meta


mutations = st.lists(
    st.tuples(st.integers(0, len(CT_DATASET) - 1), st.binary(min_size=1, max_size=8)),
    max_size=8,
)


def mutate(data: bytes, edits: list[tuple[int, bytes]], cut: int | None) -> bytes:
    buffer = bytearray(data)
    for offset, patch in edits:
        buffer[offset : offset + len(patch)] = patch
    return bytes(buffer[:cut] if cut is not None else buffer)


@settings(FUZZ, max_examples=200)
@given(
    syntax=st.sampled_from(
        [ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian]
    ),
    edits=mutations,
    cut=st.none() | st.integers(0, len(CT_DATASET)),
    noise=st.none() | st.binary(max_size=512),
)
def test_read_header_gives_a_header_or_invalid_instance(syntax, edits, cut, noise) -> None:
    data = noise if noise is not None else mutate(CT_DATASET, edits, cut)
    meta = meta_for(syntax)
    try:
        header = read_header(meta.TransferSyntaxUID, encode_file_meta(meta), data, 1 << 20)
    except InvalidInstance:
        return
    assert isinstance(header, Header)


pixel_cases = st.fixed_dictionaries(
    {
        "rows": st.integers(1, 24),
        "cols": st.integers(1, 24),
        "samples": st.sampled_from([1, 3, 2]),
        "allocated": st.sampled_from([1, 8, 16, 32, 12]),
        "stored": st.integers(1, 33),
        "signed": st.sampled_from([0, 1]),
        "photometric": st.sampled_from(
            ["MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL", "PALETTE COLOR", "HSV", ""]
        ),
        "frames": st.sampled_from([None, 1, 2, 0]),
        "length": st.sampled_from(["exact", "short", "long", "odd"]),
        "slope": st.none() | st.sampled_from([1.0, 0.0, -1.0, 1e30, float("nan")]),
        "window": st.none()
        | st.tuples(
            st.floats(allow_nan=True, allow_infinity=True),
            st.floats(allow_nan=True, allow_infinity=True),
        ),
        "seed": st.integers(0, 2**16),
    }
)


def synthetic_image(case: dict) -> Dataset:
    ds = Dataset()
    ds.file_meta = meta_for(ExplicitVRLittleEndian)
    ds.SOPClassUID, ds.SOPInstanceUID = CT, generate_uid()
    ds.Modality = "CR"
    ds.Rows, ds.Columns = case["rows"], case["cols"]
    ds.SamplesPerPixel = case["samples"]
    ds.BitsAllocated, ds.BitsStored = case["allocated"], case["stored"]
    ds.HighBit = case["stored"] - 1
    ds.PixelRepresentation = case["signed"]
    ds.PhotometricInterpretation = case["photometric"]
    if case["samples"] > 1:
        ds.PlanarConfiguration = 0
    if case["frames"] is not None:
        ds.NumberOfFrames = case["frames"]
    if case["slope"] is not None:
        ds.RescaleSlope, ds.RescaleIntercept = case["slope"], 0
    if case["window"] is not None:
        ds.WindowCenter, ds.WindowWidth = case["window"]
    size = max(case["allocated"], 8) // 8 * case["rows"] * case["cols"] * case["samples"]
    size *= max(case["frames"] or 1, 1)
    size = {"exact": size, "short": size // 2, "long": size * 2, "odd": size + 1}[case["length"]]
    data = np.random.default_rng(case["seed"]).integers(0, 256, size, dtype=np.uint8).tobytes()
    ds.PixelData = data + (b"\0" if len(data) % 2 else b"")
    ds["PixelData"].VR = "OW" if case["allocated"] > 8 else "OB"
    return ds


def _windowed(center: float, width: float) -> dict:
    """A plain 12-bit image with the given window: one that is not finite gave the model NaN
    (found by review)."""
    return {
        "rows": 24, "cols": 24, "samples": 1, "allocated": 16, "stored": 12, "signed": 0,
        "photometric": "MONOCHROME2", "frames": None, "length": "exact", "slope": None,
        "seed": 1, "window": (center, width),
    }  # fmt: skip


@settings(FUZZ, max_examples=200)
@given(case=pixel_cases)
@example(case=_windowed(float("nan"), 100.0))
@example(case=_windowed(float("inf"), 100.0))
@example(case=_windowed(100.0, float("inf")))
def test_prepare_gives_a_finite_model_input_or_not_evaluable(case: dict) -> None:
    ds = synthetic_image(case)
    try:
        display, tensor = prepare(ds, DEMO_SPEC)
    except NotEvaluable:
        return
    assert display.dtype == np.uint8 and display.ndim == 2
    assert tensor.shape == (3, *DEMO_SPEC.size) and tensor.dtype == np.float32
    assert np.isfinite(tensor).all(), f"non-finite model input for {case}"


# ---------------------------------------------------------------------------------------------
# Through a real listener


@pytest.fixture(scope="module")
def listener(tmp_path_factory: pytest.TempPathFactory):
    peers = [{"ae_title": SENDER, "hosts": ["127.0.0.1"]}]
    with Listener(tmp_path_factory.mktemp("fuzz"), AET, peers) as daemon:
        yield daemon


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz-files")


def send_raw(listener: Listener, path: Path) -> int | None:
    """Send a file's dataset bytes as they are (pynetdicom reads only its file meta)."""
    ae = AE(ae_title=SENDER)
    ae.add_requested_context(CT, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", listener.port, ae_title=AET)
    assert assoc.is_established, "the listener refused an association"
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        status = assoc.send_c_store(path)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
        if assoc.is_established:
            assoc.release()
    return int(status.Status) if status and "Status" in status else None


@settings(FUZZ, max_examples=25)
@given(edits=mutations, cut=st.none() | st.integers(0, len(CT_DATASET)))
def test_mutated_instances_get_a_clear_status_and_the_listener_stays_up(
    listener: Listener, scratch: Path, edits, cut
) -> None:
    data = mutate(CT_DATASET, edits, cut)
    path = scratch / "case.dcm"
    path.write_bytes(encode_file_meta(meta_for(ExplicitVRLittleEndian, CT_SOP_UID)) + data)
    status = send_raw(listener, path)
    # Stored (or kept as a resend) when the mutation left the header readable, else 0xC000.
    assert status in (0x0000, 0xC000), f"status {status} for a mutated dataset"
    log = listener.log()
    assert "failed:" not in log and "Traceback" not in log, log[-3000:]
    assert not list((listener.root / "var" / "spool").rglob(".*.tmp"))


def test_listener_still_answers_after_fuzzing(listener: Listener) -> None:
    assert echoscu(listener.port, aet=SENDER, aec=AET).returncode == 0
