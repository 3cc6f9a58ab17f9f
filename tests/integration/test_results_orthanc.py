"""Results a PACS and a viewer take: Orthanc indexes them, dcmtk shows the heat on the lesion."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from servers import dciodvfy, require_program, sample_file
from sqlalchemy import select, update
from test_job_runner import ingest, world  # noqa: F401 (world is a fixture)

from dicomai.db.models import Delivery, DeliveryState, Job, JobState, OutputObject
from dicomai.imaging.preprocess import prepare
from dicomai.inference.runner import Classifier
from dicomai.jobs.assembler import complete_quiet_studies
from dicomai.jobs.runner import JobRunner
from dicomai.models.package import load_model
from dicomai.results.codes import shown_probability
from dicomai.results.context import ModelIdentity, ResultContext, SourceImage
from dicomai.results.pmap import build_heatmap_pmap
from dicomai.results.sc import build_sc
from dicomai.results.seg import build_seg
from dicomai.results.sr import build_sr
from dicomai.training.synthetic import WrittenImage, write_dicom_images

DEMO = Path(__file__).resolve().parents[2] / "models" / "demo-chest-nodule"
SC_SIDE = 512  # a 256² source is scaled up to 512² (sc.MIN_SIDE)


@pytest.fixture(scope="module")
def classifier() -> Classifier:
    return Classifier(load_model(DEMO), device="cpu")


@pytest.fixture
def nodule(tmp_path) -> WrittenImage:
    """A synthetic radiograph with a painted nodule that the demo model finds."""
    written = write_dicom_images(tmp_path / "synthetic", 8, seed=11, size=256)
    return next(w for w in written if w.label == 1 and w.radius >= 15)


def _context(classifier: Classifier, datasets: list[pydicom.Dataset]) -> ResultContext:
    manifest = classifier.loaded.manifest
    sources, inputs = [], []
    for ds in datasets:
        display, tensor = prepare(ds, manifest.input)
        sources.append(SourceImage(ds, display))
        inputs.append((str(ds.SOPInstanceUID), tensor))
    return ResultContext(
        sources=tuple(sources),
        predictions=tuple(classifier.predict(inputs)),
        model=ModelIdentity(
            manifest.name, manifest.version, manifest.architecture, manifest.weights_sha256
        ),
        input_digest="integration",
    )


def _write(ds: pydicom.Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    verdict = dciodvfy(path)
    assert verdict.ok, f"dciodvfy rejects {path.name}:\n{verdict.output}"
    return path


def _any_modality(classifier: Classifier, ds: pydicom.Dataset) -> ResultContext:
    """A context for pydicom's CT sample: the demo model run on it regardless of modality."""
    context = _context(classifier, [ds])
    (prediction,) = context.predictions
    mask = (prediction.heatmap >= 0.5).astype(np.float32)
    masked = dataclasses.replace(prediction, extra_maps={"segmentation": mask})
    return dataclasses.replace(context, predictions=(masked,))


def test_orthanc_indexes_every_kind_of_output(classifier, nodule, tmp_path, orthanc):
    context = _context(classifier, [pydicom.dcmread(nodule.path)])
    assert context.predictions[0].score("nodule").positive, "the demo model missed the nodule"
    ct = _any_modality(classifier, pydicom.dcmread(sample_file("CT_small.dcm")))
    objects = {
        "sr": build_sr(context),
        "sc": build_sc(context, 0),
        "seg": build_seg(ct, 0),
        "pmap": build_heatmap_pmap(ct, 0),
        "ct-sr": build_sr(ct),
    }

    for kind, ds in objects.items():
        path = _write(ds, tmp_path / f"{kind}.dcm")
        orthanc.upload_instance(path.read_bytes())

    for kind, ds in objects.items():
        orthanc_id = orthanc.find_sop_instance(str(ds.SOPInstanceUID))
        assert orthanc_id, f"Orthanc did not index the {kind}"
        tags = orthanc.instance_tags(orthanc_id)
        assert tags["SOPClassUID"] == ds.SOPClassUID, kind
        assert tags["StudyInstanceUID"] == ds.StudyInstanceUID, kind
    assert orthanc.count_instances() == len(objects)


def test_dsrdump_shows_the_real_finding_with_its_region(classifier, nodule, tmp_path):
    context = _context(classifier, [pydicom.dcmread(nodule.path)])
    path = _write(build_sr(context), tmp_path / "sr.dcm")

    dump = subprocess.run(
        [require_program("dsrdump", "dcmtk"), str(path)], capture_output=True, text=True
    ).stdout

    score = context.predictions[0].score("nodule")
    probability = shown_probability(score, 4)
    assert '<contains CODE:(,,"Finding")=(27925004,SCT,"Nodule")>' in dump
    assert '<contains CODE:(,,"Nodule")=(52101004,SCT,"Present")>' in dump
    assert f'"Probability")="{probability:g}"' in dump
    assert 'SCOORD:(,,"Image Region")=(POLYLINE,' in dump
    assert nodule.sop_instance_uid in _references(pydicom.dcmread(path))


def _references(sr: pydicom.Dataset) -> set[str]:
    return {
        instance.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for instance in series.ReferencedSOPSequence
    }


def test_dcmj2pnm_shows_the_heat_map_peak_over_the_painted_nodule(classifier, nodule, tmp_path):
    context = _context(classifier, [pydicom.dcmread(nodule.path)])
    sc = _write(build_sc(context, 0), tmp_path / "sc.dcm")
    png = tmp_path / "sc.png"

    subprocess.run([require_program("dcmj2pnm", "dcmtk"), "+on", str(sc), str(png)], check=True)
    pixels = cv2.imread(str(png))

    assert pixels is not None, "dcmj2pnm wrote no readable PNG"
    blue, green, red = (pixels[:SC_SIDE, :, channel].astype(np.int32) for channel in range(3))
    redness = red - (green + blue) // 2
    rows, columns = np.nonzero(redness > 0.8 * redness.max())
    scale = SC_SIDE / 256
    centre = np.array([rows.mean(), columns.mean()]) / scale
    distance = float(np.hypot(*(centre - np.array(nodule.centre))))
    assert distance <= nodule.radius, (
        f"hottest region at {centre} (source pixels), nodule at {nodule.centre} "
        f"with radius {nodule.radius:.1f}"
    )


def _late_study(tmp_path: Path) -> list[pydicom.Dataset]:
    written = write_dicom_images(tmp_path / "study", 6, seed=3, size=256)
    datasets = [pydicom.dcmread(w.path) for w in written[:2]]
    datasets[1].StudyInstanceUID = datasets[0].StudyInstanceUID
    return datasets


@pytest.fixture
def pacs_world(world, orthanc):  # noqa: F811 (world is the imported fixture)
    settings, sessions, tmp_path = world
    pacs = settings.destinations[0].model_copy(
        update={
            "name": "pacs",
            "path": None,
            "ae_title": orthanc.aet,
            "host": "127.0.0.1",
            "port": orthanc.dicom_port,
        }
    )
    folder = settings.destinations[0].model_copy(update={"kinds": ["sr"]})
    settings = settings.model_copy(update={"destinations": [folder, pacs]})
    return settings, sessions, tmp_path


def test_rerun_leaves_orthanc_with_the_same_instances(pacs_world, orthanc):
    settings, sessions, tmp_path = pacs_world
    for ds in _late_study(tmp_path):
        ingest(settings, sessions, ds, tmp_path)
    (job_id,) = complete_quiet_studies(sessions, 0)
    runner = JobRunner(settings, sessions, device="cpu")
    runner.run_job(job_id)
    first = sorted(orthanc.instances())
    assert len(first) == 3, "expected the SR and two overlays in Orthanc"

    with sessions() as session, session.begin():
        session.execute(update(Job).values(state=JobState.QUEUED))
        session.execute(update(Delivery).values(state=DeliveryState.PENDING))
    runner.run_job(job_id)
    with sessions() as session:
        pending = session.scalars(
            select(Delivery.id).where(Delivery.state != DeliveryState.SENT)
        ).all()
    for delivery_id in pending:
        runner.deliver(delivery_id)

    assert sorted(orthanc.instances()) == first, "a re-run added objects to the PACS"
    delivered = list((tmp_path / "delivered").iterdir())
    assert [pydicom.dcmread(p).Modality for p in delivered] == ["SR"], (
        "the folder destination takes SR only"
    )


def test_late_images_give_an_sr_that_names_its_predecessor(world, tmp_path):  # noqa: F811
    settings, sessions, _ = world
    first_image, late_image = _late_study(tmp_path)
    runner = JobRunner(settings, sessions, device="cpu")
    ingest(settings, sessions, first_image, tmp_path)
    (first_job,) = complete_quiet_studies(sessions, 0)
    runner.run_job(first_job)
    ingest(settings, sessions, late_image, tmp_path)
    (second_job,) = complete_quiet_studies(sessions, 0)
    runner.run_job(second_job)

    with sessions() as session:
        srs = {
            job_id: (series, sop)
            for job_id, series, sop in session.execute(
                select(
                    OutputObject.job_id, OutputObject.series_uid, OutputObject.sop_instance_uid
                ).where(OutputObject.kind == "sr")
            )
        }
    assert set(srs) == {first_job, second_job}
    path = next(
        p
        for p in (tmp_path / "delivered").iterdir()
        if pydicom.dcmread(p).SOPInstanceUID == srs[second_job][1]
    )
    verdict = dciodvfy(path)
    assert verdict.ok, verdict.output
    second = pydicom.dcmread(path)
    (study,) = second.PredecessorDocumentsSequence
    (series,) = study.ReferencedSeriesSequence
    assert study.StudyInstanceUID == first_image.StudyInstanceUID
    assert series.SeriesInstanceUID == srs[first_job][0]
    assert series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == srs[first_job][1]
    assert {late_image.SOPInstanceUID, first_image.SOPInstanceUID} <= _references(second)
