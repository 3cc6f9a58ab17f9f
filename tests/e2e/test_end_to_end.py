"""A study pushed with storescu comes back to the PACS (Orthanc) as an SR and heat-map overlays."""

from __future__ import annotations

import time
from pathlib import Path

import pydicom
import pytest
from daemon import DEMO, Daemon, any_modality_package, dicomai, write_config
from servers import OrthancServer, dciodvfy, free_port, sample_file, storescu, wait_for
from sqlalchemy import create_engine, text

from dicomai.training.synthetic import write_dicom_images

AET = "DICOMAI"
SENDER = "STORESCU"
PATIENT_VALUES = ("Demo^Patient", "CompressedSamples^CT1")


def two_image_study(folder: Path) -> list[Path]:
    """Two synthetic radiographs (one with a nodule, one without) in one study."""
    written = write_dicom_images(folder, 8, seed=7, size=256)
    positive = next(w for w in written if w.label == 1)
    negative = next(w for w in written if w.label == 0)
    ds = pydicom.dcmread(negative.path)
    ds.StudyInstanceUID = positive.study_uid
    ds.save_as(negative.path)
    return [positive.path, negative.path]


def query(url: str, sql: str, **params: object) -> list[tuple]:
    engine = create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    try:
        with engine.connect() as connection:
            return [tuple(row) for row in connection.execute(text(sql), params)]
    finally:
        engine.dispose()


@pytest.fixture(params=["embedded-sqlite", "redis-postgresql"])
def stack(request: pytest.FixtureRequest, tmp_path: Path, orthanc: OrthancServer):
    """dicomai with its database and broker, the demo models active, Orthanc as destination."""
    production = request.param == "redis-postgresql"
    port = free_port()
    storage = tmp_path / "var"
    db_url = (
        request.getfixturevalue("postgres_url")
        if production
        else f"sqlite:///{storage / 'dicomai.db'}"
    )
    tables = {
        "ingest": {"ae_title": AET, "host": "127.0.0.1", "port": port, "study_quiet_seconds": 1.0},
        "storage": {"dir": str(storage)},
        "database": {"url": db_url},
        "worker": {"embedded": not production, "device": "cpu"},
        "delivery": {"backoff_initial_seconds": 1.0},
    }
    if production:
        tables["broker"] = {"url": request.getfixturevalue("redis_server").url}
    config = write_config(
        tmp_path / "dicomai.toml",
        tables,
        {
            "ingest.peers": [{"ae_title": SENDER, "hosts": ["127.0.0.1"]}],
            "destinations": [
                {
                    "name": "pacs",
                    "ae_title": orthanc.aet,
                    "host": "127.0.0.1",
                    "port": orthanc.dicom_port,
                }
            ],
        },
    )
    dicomai(config, "db", "upgrade")
    for package in (DEMO, any_modality_package(tmp_path)):
        dicomai(config, "models", "register", str(package))
    dicomai(config, "models", "activate", "demo-chest-nodule", "1.0.0")
    dicomai(config, "models", "activate", "demo-any", "1.0.0")
    processes = [Daemon(config, tmp_path / "serve.log")]
    if production:
        processes.append(Daemon(config, tmp_path / "worker.log", command="worker"))
    for process in processes:
        process.start()
    try:
        processes[0].wait_listening(port, SENDER, AET)
        yield {
            "port": port,
            "db": db_url,
            "logs": [p.log_path for p in processes],
            "tmp": tmp_path,
            "mode": request.param,
        }
    finally:
        for process in processes:
            process.stop()


def test_study_comes_back_as_sr_and_overlays(stack: dict, orthanc: OrthancServer) -> None:
    inputs = [*two_image_study(stack["tmp"] / "inputs"), sample_file("CT_small.dcm")]
    sent = storescu(stack["port"], inputs, aet=SENDER, aec=AET)
    assert sent.returncode == 0, sent.stderr
    sent_at = time.monotonic()

    # DX study: two models apply, each gives 1 SR + 2 SC; CT study: demo-any only, 1 SR + 1 SC
    # + 1 Parametric Map of the heat map (the CT lies in a patient frame of reference).
    expected = 2 * (1 + 2) + (1 + 1 + 1)
    wait_for(
        lambda: orthanc.count_instances() >= expected,
        240,
        f"{expected} result objects in Orthanc",
        details=lambda: "\n".join(p.read_text()[-3000:] for p in stack["logs"]),
    )
    print(
        f"[{stack['mode']}] last image sent -> {expected} objects in Orthanc: "
        f"{time.monotonic() - sent_at:.1f} s (quiet period 1.0 s)"
    )
    assert orthanc.count_instances() == expected

    modalities, classes = [], []
    for orthanc_id in orthanc.instances():
        data = orthanc.instance_file(orthanc_id)
        path = stack["tmp"] / f"{orthanc_id}.dcm"
        path.write_bytes(data)
        verdict = dciodvfy(path)
        assert verdict.ok, f"dciodvfy rejects an output:\n{verdict.output}"
        ds = pydicom.dcmread(path)
        modalities.append(ds.Modality)
        classes.append(ds.SOPClassUID.name)
        if ds.SOPClassUID.name.startswith("Secondary"):
            assert ds.PhotometricInterpretation == "RGB"
            assert ds.ImageType[0] == "DERIVED"
    assert modalities.count("SR") == 3
    assert classes.count("Parametric Map Storage") == 1

    db = stack["db"]
    assert query(db, "SELECT count(*) FROM studies WHERE state = 'complete'") == [(2,)]
    assert query(db, "SELECT count(*) FROM instances") == [(3,)]
    assert query(db, "SELECT state, count(*) FROM jobs GROUP BY state") == [("done", 3)]
    assert query(db, "SELECT count(*) FROM predictions WHERE evaluated") == [(5,)]
    assert query(db, "SELECT state, count(*) FROM deliveries GROUP BY state") == [
        ("sent", expected)
    ]
    actions = {row[0] for row in query(db, "SELECT DISTINCT action FROM audit_events")}
    assert {
        "instance.stored",
        "study.completed",
        "job.created",
        "job.done",
        "delivery.sent",
        "model.activated",
    } <= actions

    for log in stack["logs"]:
        content = log.read_text(errors="replace")
        for value in PATIENT_VALUES:
            assert value not in content, f"patient data {value!r} leaked into {log.name}"
