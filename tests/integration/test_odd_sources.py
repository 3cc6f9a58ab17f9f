"""Sources as PACSs really send them: values a strict parser refuses still get the study its
report, and a superseding SR names the report the PACS actually received."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag
from rollout_site import package
from servers import dciodvfy
from sqlalchemy import select
from test_job_runner import ingest, make_world

from dicomai.audit import Operator, os_user
from dicomai.db.models import Delivery, Job, JobState, OutputObject, Prediction
from dicomai.jobs.assembler import complete_quiet_studies
from dicomai.jobs.runner import JobRunner
from dicomai.results.context import MODEL_BLOCKS, model_block
from dicomai.results.sc import OverlayBuilder
from dicomai.rollout.deployment import shadow
from dicomai.rollout.registry import register
from dicomai.training.synthetic import write_dicom_images

NAME = "demo-chest-nodule"


def raw(tag: int, vr: str, value: bytes) -> RawDataElement:
    """An element as the file holds it: pydicom checks nothing until it is read."""
    return RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)


def run_all(settings, sessions) -> list[Job]:
    runner = JobRunner(settings, sessions, device="cpu")
    for job_id in complete_quiet_studies(sessions, 0):
        runner.run_job(job_id)
    with sessions() as session:
        jobs = session.scalars(select(Job).order_by(Job.id)).all()
        for job in jobs:
            _ = job.error, [o.kind for o in job.outputs]
        return list(jobs)


def delivered(folder: Path) -> list[pydicom.Dataset]:
    found = []
    for path in sorted(folder.iterdir()):
        verdict = dciodvfy(path)
        assert verdict.ok, verdict.output
        found.append(pydicom.dcmread(path))
    return found


# (keyword, tag, VR, value as sent, value in the results): everyday values that highdicom
# refused, failing the job: unknown sex, a zero birth date, ACR-NEMA dates and times, lower
# case, a second name.
ODD_VALUES = [
    ("PatientSex", 0x00100040, "CS", b"U ", ""),
    ("PatientSex", 0x00100040, "CS", b"m ", "M"),
    ("PatientBirthDate", 0x00100030, "DA", b"00000000", ""),
    ("StudyDate", 0x00080020, "DA", b"2001-01-01", "20010101"),
    ("StudyTime", 0x00080030, "TM", b"14:04:38", "140438"),
    ("StudyTime", 0x00080030, "TM", b"240000", ""),
    ("PatientName", 0x00100010, "PN", b"Doe^Jane\\Roe^Jo ", "Doe^Jane"),
]


@pytest.mark.parametrize(("keyword", "tag", "vr", "sent", "shown"), ODD_VALUES)
def test_patient_and_study_values_a_parser_refuses_still_get_a_report(
    tmp_path: Path, keyword: str, tag: int, vr: str, sent: bytes, shown: str
) -> None:
    settings, sessions, _ = make_world(tmp_path)
    (written,) = write_dicom_images(tmp_path / "in", 1, seed=21, size=128)
    ds = pydicom.dcmread(written.path)
    ds[tag] = raw(tag, vr, sent)
    ingest(settings, sessions, ds, tmp_path)

    (job,) = run_all(settings, sessions)
    assert job.state == JobState.DONE, job.error
    outputs = delivered(tmp_path / "delivered")
    assert sorted(o.Modality for o in outputs) == ["OT", "SR"]
    for output in outputs:
        assert str(output.get(keyword, "")) == shown, (output.Modality, output.get(keyword))
        assert output.PatientID == ds.PatientID and output.StudyInstanceUID == ds.StudyInstanceUID


# One image of three carries one value pydicom reads as text where a number belongs, or a
# vendor's private image class: the other two must still be reported.
ONE_BAD_IMAGE = {
    "slice-thickness": (0x00180050, "DS", b"thin"),
    "number-of-frames": (0x00280008, "IS", b"1A"),
    "imager-pixel-spacing": (0x00181164, "DS", b"abc\\1 "),
    # Sent as UN by a router whose dictionary lacks it; pydicom reads it as the DS it is.
    "slice-thickness-as-un": (0x00180050, "UN", b"thin"),
    "number-of-frames-as-un": (0x00280008, "UN", b"1A"),
    "private-sop-class": (0x00080016, "UI", b"1.2.840.113619.4.26\x00"),
}


@pytest.mark.parametrize("case", list(ONE_BAD_IMAGE))
def test_one_malformed_image_does_not_cost_the_study_its_report(tmp_path: Path, case: str) -> None:
    settings, sessions, _ = make_world(tmp_path)
    written = write_dicom_images(tmp_path / "in", 3, seed=12, size=128)
    datasets = [pydicom.dcmread(w.path) for w in written]
    for ds in datasets[1:]:
        ds.StudyInstanceUID = datasets[0].StudyInstanceUID
    tag, vr, value = ONE_BAD_IMAGE[case]
    odd = datasets[2]
    odd[tag] = raw(tag, vr, value)
    if case == "private-sop-class":
        odd.file_meta.MediaStorageSOPClassUID = value.rstrip(b"\x00").decode()
    for ds in datasets:
        ingest(settings, sessions, ds, tmp_path)

    (job,) = run_all(settings, sessions)
    assert job.state == JobState.DONE, job.error
    outputs = delivered(tmp_path / "delivered")
    (sr,) = [o for o in outputs if o.Modality == "SR"]
    referenced = {
        str(reference.ReferencedSOPInstanceUID)
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for reference in series.ReferencedSOPSequence
    }
    good = {str(ds.SOPInstanceUID) for ds in datasets[:2]}
    assert good <= referenced
    with sessions() as session:
        rows = {
            p.instance.sop_instance_uid: p
            for p in session.scalars(select(Prediction).where(Prediction.job_id == job.id))
        }
        assert all(rows[uid].evaluated for uid in good)
        if case == "private-sop-class":
            assert not rows[str(odd.SOPInstanceUID)].evaluated
            assert "not a standard image" in rows[str(odd.SOPInstanceUID)].reason
        else:
            assert str(odd.SOPInstanceUID) in referenced


def test_a_superseding_sr_names_the_report_the_pacs_received_not_a_shadows(
    tmp_path: Path,
) -> None:
    settings, sessions, _ = make_world(tmp_path)
    with sessions() as session, session.begin():
        operator = Operator(os_user(), "test")
        register(session, package(tmp_path, "1.1.0"), settings.registry_dir, operator)
        shadow(session, NAME, "1.1.0", operator)
    first, late = [
        pydicom.dcmread(w.path) for w in write_dicom_images(tmp_path / "in", 2, seed=31, size=128)
    ]
    late.StudyInstanceUID = first.StudyInstanceUID
    ingest(settings, sessions, first, tmp_path)
    run_all(settings, sessions)  # the active version's SR is sent, the shadow's kept
    ingest(settings, sessions, late, tmp_path)
    jobs = run_all(settings, sessions)
    assert [j.state for j in jobs] == [JobState.DONE] * 4

    with sessions() as session:
        sent_srs = session.scalars(
            select(OutputObject.sop_instance_uid)
            .join(Delivery, Delivery.output_id == OutputObject.id)
            .where(OutputObject.kind == "sr")
            .order_by(OutputObject.id)
        ).all()
    assert len(sent_srs) == 2, "the active version's two SRs, and no shadow's"
    (second,) = [o for o in delivered(tmp_path / "delivered") if o.SOPInstanceUID == sent_srs[1]]
    named = [
        str(reference.ReferencedSOPInstanceUID)
        for study in second.PredecessorDocumentsSequence
        for series in study.ReferencedSeriesSequence
        for reference in series.ReferencedSOPSequence
    ]
    assert named == [sent_srs[0]]
    # The update stands apart from the first report in the PACS's series list.
    outputs = delivered(tmp_path / "delivered")
    series = {(o.Modality, int(o.SeriesNumber), str(o.SeriesDescription)[:14]) for o in outputs}
    first = 9001 + 10 * model_block(NAME)  # the model's own block (`model_block`)
    later = first + 10 * MODEL_BLOCKS
    assert series == {
        ("SR", first, "AI findings (d"),
        ("OT", first + 1, "AI heat map (d"),
        ("SR", later, "AI findings #2"),
        ("OT", later + 1, "AI heat map #2"),
    }, series


def test_an_overlay_that_cannot_be_built_is_left_out_and_the_others_are_sent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, sessions, _ = make_world(tmp_path)
    written = write_dicom_images(tmp_path / "in", 2, seed=14, size=128)
    datasets = [pydicom.dcmread(w.path) for w in written]
    datasets[1].StudyInstanceUID = datasets[0].StudyInstanceUID
    for ds in datasets:
        ingest(settings, sessions, ds, tmp_path)
    build = OverlayBuilder.build

    def fails_for_the_first(self: OverlayBuilder, index: int) -> pydicom.Dataset:
        if index == 0:
            raise ValueError("a geometry highdicom rejects")
        return build(self, index)

    monkeypatch.setattr(OverlayBuilder, "build", fails_for_the_first)
    (job,) = run_all(settings, sessions)
    assert job.state == JobState.DONE, job.error
    assert sorted(o.Modality for o in delivered(tmp_path / "delivered")) == ["OT", "SR"]
