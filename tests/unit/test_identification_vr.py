"""A source whose patient or study identification came with the wrong VR keeps it in the
results: a Patient ID labelled DS had been dropped (the SR reached the PACS without one), and a
Patient's Name labelled US failed every attempt of the study's job."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pydicom
from test_results import _display, _evaluated, make_context

from dicomai.imaging.decode import read_instance
from dicomai.results.context import SourceImage
from dicomai.results.sr import build_sr

NAME, PATIENT_ID, ACCESSION = "Zyxwqv^Qqqjane", "PIDZQ9137", "ACCZQ771"


def with_wrong_vrs(source: pydicom.Dataset, path: Path) -> Path:
    """`source` saved in explicit VR little endian, then relabelled on disk: Patient's Name
    US, Patient ID DS, Accession Number UI (every one a 2-byte-length VR, like the real ones)."""
    source.PatientName, source.PatientID, source.AccessionNumber = NAME, PATIENT_ID, ACCESSION
    source.save_as(path, enforce_file_format=True)
    data = path.read_bytes()
    for tag, right, wrong in (
        (b"\x10\x00\x10\x00", b"PN", b"US"),
        (b"\x10\x00\x20\x00", b"LO", b"DS"),
        (b"\x08\x00\x50\x00", b"SH", b"UI"),
    ):
        assert data.count(tag + right) == 1
        data = data.replace(tag + right, tag + wrong)
    path.write_bytes(data)
    return path


def test_identification_sent_with_another_vr_is_read_with_the_dictionary_s(
    tmp_path: Path,
) -> None:
    context = make_context()
    cr = context.sources[2].dataset
    dataset = read_instance(with_wrong_vrs(cr, tmp_path / "cr.dcm"))

    assert str(dataset.PatientName) == NAME
    assert dataset.PatientID == PATIENT_ID and dataset["PatientID"].VR == "LO"
    assert dataset.AccessionNumber == ACCESSION
    # The report the PACS files by these values carries them.
    source = SourceImage(dataset, _display(dataset))
    report = build_sr(
        dataclasses.replace(context, sources=(source,), predictions=(_evaluated(dataset, 0.9),))
    )
    assert str(report.PatientName) == NAME
    assert report.PatientID == PATIENT_ID and report.AccessionNumber == ACCESSION
