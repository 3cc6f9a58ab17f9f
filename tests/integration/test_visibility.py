"""What an administrator sees: Prometheus metrics, `dicomai health`, non-image objects kept."""

from __future__ import annotations

import io
import signal
import time
import tomllib
import urllib.request
from pathlib import Path

import pydicom
import pytest
from daemon import Listener, accepted_by_process, dicomai
from pynetdicom import AE
from servers import RedisServer, free_port, sample_file, storescu, wait_for

from dicomai.training.synthetic import write_dicom_images

AET = "DICOMAI"
MODALITY = "MODALITY"


@pytest.fixture(scope="module")
def listener(tmp_path_factory: pytest.TempPathFactory):
    peers = [{"ae_title": MODALITY, "hosts": ["127.0.0.1"]}]
    metrics_port = free_port()
    root = tmp_path_factory.mktemp("visible")
    daemon = Listener(root, AET, peers)
    text = daemon.config.read_text()
    daemon.config.write_text(text + f'[metrics]\nhost = "127.0.0.1"\nport = {metrics_port}\n')
    # A model in service, or `health` fails; the demo takes DX and CR, which no test here sends.
    demo = Path(__file__).parents[2] / "models" / "demo-chest-nodule"
    dicomai(daemon.config, "db", "upgrade")
    dicomai(daemon.config, "models", "register", str(demo))
    version = tomllib.loads((demo / "model.toml").read_text())["version"]
    dicomai(daemon.config, "models", "activate", "demo-chest-nodule", version)
    with daemon:
        daemon.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"  # type: ignore[attr-defined]
        yield daemon


def metrics(listener: Listener) -> str:
    with urllib.request.urlopen(listener.metrics_url, timeout=10) as response:  # type: ignore[attr-defined]
        return response.read().decode()


def test_metrics_count_stores_by_calling_ae_and_status(listener: Listener) -> None:
    assert storescu(listener.port, [sample_file("CT_small.dcm")], aet=MODALITY).returncode == 0
    storescu(listener.port, [sample_file("CT_small.dcm")], aet="STRANGER")
    text = metrics(listener)
    assert 'dicomai_stores_total{calling_ae="MODALITY",status="0x0000"} 1.0' in text
    assert "dicomai_stored_bytes_total" in text
    assert (
        'dicomai_rejected_associations_total{reason="calling AE title not in allow-list"}' in text
    )
    wait_for(lambda: "dicomai_spool_free_bytes 0.0" not in metrics(listener), 10, "spool gauge")


def test_without_an_embedded_worker_only_the_database_counts_jobs_and_deliveries(
    listener: Listener,
) -> None:
    """With standalone workers `serve` served `dicomai_jobs_total` and
    `dicomai_deliveries_total` at 0 whatever the workers did: an alert on them never fired."""
    text = metrics(listener)
    assert "dicomai_jobs_total" not in text, text
    assert "dicomai_deliveries_total" not in text, text
    assert 'dicomai_jobs_in_state{state="failed"}' in text, text
    assert 'dicomai_deliveries_in_state{state="failed"}' in text, text
    assert "dicomai_open_associations" in text, text


def test_metrics_count_the_stores_of_every_listener_process_and_the_jobs_in_the_database(
    tmp_path: Path,
) -> None:
    peers = [{"ae_title": MODALITY, "hosts": ["127.0.0.1"]}]
    metrics_port = free_port()
    daemon = Listener(tmp_path / "two", AET, peers, listener_processes=2)
    daemon.config.write_text(
        daemon.config.read_text() + f'[metrics]\nhost = "127.0.0.1"\nport = {metrics_port}\n'
    )
    daemon.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"  # type: ignore[attr-defined]
    source = pydicom.dcmread(sample_file("CT_small.dcm"))
    source.Modality = "DX"  # for the demo model's job
    demo = Path(__file__).parents[2] / "models" / "demo-chest-nodule"
    dicomai(daemon.config, "db", "upgrade")
    dicomai(daemon.config, "models", "register", str(demo))
    version = tomllib.loads((demo / "model.toml").read_text())["version"]
    dicomai(daemon.config, "models", "activate", "demo-chest-nodule", version)
    with daemon:
        wait_for(lambda: daemon.log().count("listening as") == 2, 60, "a second listener")
        ae = AE(ae_title=MODALITY)
        ae.add_requested_context(source.SOPClassUID, source.file_meta.TransferSyntaxUID)
        held = [ae.associate("127.0.0.1", daemon.port, ae_title=AET) for _ in range(2)]
        try:
            assert all(assoc.is_established for assoc in held)
            assert daemon.process is not None
            wait_for(
                lambda: (
                    sorted(accepted_by_process(daemon.process.pid, daemon.port).values()) == [1, 1]
                ),
                10,
                "one association in each listener process",
            )
            assert "dicomai_open_associations 2.0" in metrics(daemon)
            for number, assoc in enumerate(held):
                for copy in range(3):
                    source.SOPInstanceUID = f"{source.StudyInstanceUID}.{number}.{copy}"
                    assert assoc.send_c_store(source).Status == 0x0000
        finally:
            for assoc in held:
                assoc.release()
        text = metrics(daemon)
        assert 'dicomai_stores_total{calling_ae="MODALITY",status="0x0000"} 6.0' in text, text
        wait_for(lambda: "dicomai_open_associations 0.0" in metrics(daemon), 10, "closed")
        # The completed study's job (no worker runs), counted from the database.
        wait_for(lambda: daemon.query("SELECT count(*) FROM jobs") == [(1,)], 30, "its job")
        state = daemon.query("SELECT state FROM jobs")[0][0]
        text = metrics(daemon)
        assert f'dicomai_jobs_in_state{{state="{state}"}} 1.0' in text, text
        assert 'dicomai_deliveries_in_state{state="failed"} 0.0' in text
        assert "dicomai_database_up 1.0" in text


def test_health_reports_every_check_and_fails_when_the_database_is_gone(
    listener: Listener, tmp_path: Path
) -> None:
    ok = dicomai(listener.config, "health", check=False)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    for check in ("database", "models", "broker", "spool", "worker", "deliveries", "listener"):
        assert check in ok.stdout
    broken = dicomai(
        listener.config,
        "health",
        check=False,
        env={"DICOMAI_DATABASE__URL": f"sqlite:///{tmp_path / 'none' / 'x.db'}"},
    )
    assert broken.returncode == 1
    assert "FAIL" in broken.stdout
    # The checks that read the database say why they did not run, not the SQL error again.
    (worker,) = [line for line in broken.stdout.splitlines() if line.startswith("worker")]
    assert "not checked: the database check failed" in worker, broken.stdout
    assert sum("OperationalError" in line for line in broken.stdout.splitlines()) <= 1


def rejections(listener: Listener) -> int:
    found = listener.query(
        "SELECT count(*) FROM audit_events WHERE action = 'association.rejected'"
    )
    return int(found[0][0])


def test_health_probe_is_answered_without_an_audit_row_and_cannot_store(
    listener: Listener,
) -> None:
    before = rejections(listener)
    ok = dicomai(listener.config, "health", check=False)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "C-ECHO answered" in ok.stdout
    assert "rejected" not in (ok.stdout + ok.stderr).lower()
    assert rejections(listener) == before
    # The probe's title gets Verification only: asking to store with it is an unknown sender.
    sent = storescu(listener.port, [sample_file("CT_small.dcm")], aet="DICOMAI_HEALTH")
    assert sent.returncode != 0
    assert rejections(listener) == before + 1


def store_on_context(
    assoc, dataset: pydicom.Dataset, context_id: int, sop_class: str | None = None
) -> int | None:
    """Send `dataset` (implicit VR) as a C-STORE on presentation context `context_id`, naming
    `sop_class` (default: the dataset's) whatever that context was negotiated for, as a
    hostile or broken peer can."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset
    from pynetdicom.dimse_primitives import C_STORE

    encoded = DicomBytesIO()
    encoded.is_little_endian, encoded.is_implicit_VR = True, True
    write_dataset(encoded, dataset)
    request = C_STORE()
    request.MessageID = 1
    request.AffectedSOPClassUID = sop_class or dataset.SOPClassUID
    request.AffectedSOPInstanceUID = dataset.SOPInstanceUID
    request.Priority = 2
    request.DataSet = io.BytesIO(encoded.getvalue())
    # Hold the association's reactor, which would otherwise take the response.
    assoc._reactor_checkpoint.clear()
    while not assoc._is_paused:
        time.sleep(0.001)
    try:
        assoc.dimse.send_msg(request, context_id)
        _, response = assoc.dimse.get_msg(block=True)
    finally:
        assoc._reactor_checkpoint.set()
    return None if response is None else int(response.Status)


@pytest.mark.parametrize("calling", ["DICOMAI_HEALTH", MODALITY])
def test_a_store_on_a_verification_context_is_refused_and_audited(
    listener: Listener, calling: str
) -> None:
    dataset = pydicom.dcmread(sample_file("CT_small.dcm"))
    dataset.SOPInstanceUID = f"{dataset.SOPInstanceUID}.{len(calling)}"
    ae = AE(ae_title=calling)
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", listener.port, ae_title=AET)
    assert assoc.is_established  # the health probe's exemption, or an allowed sender
    try:
        status = store_on_context(assoc, dataset, assoc.accepted_contexts[0].context_id)
    finally:
        assoc.release()
    assert status is not None and status >= 0xA000, status
    assert listener.query(
        "SELECT count(*) FROM instances WHERE sop_instance_uid = :u", u=dataset.SOPInstanceUID
    ) == [(0,)]
    assert listener.query(
        "SELECT count(*) FROM audit_events WHERE action = 'instance.rejected' AND actor = :a",
        a=calling,
    ) == [(1,)]


def test_a_dataset_of_another_sop_class_than_its_request_names_is_refused(
    listener: Listener,
) -> None:
    dataset = pydicom.dcmread(sample_file("MR_small.dcm"))  # an MR image ...
    ct = "1.2.840.10008.5.1.4.1.1.2"
    ae = AE(ae_title=MODALITY)
    ae.add_requested_context(ct, "1.2.840.10008.1.2")
    assoc = ae.associate("127.0.0.1", listener.port, ae_title=AET)
    assert assoc.is_established
    try:  # ... sent as a CT image on the CT context
        status = store_on_context(assoc, dataset, assoc.accepted_contexts[0].context_id, ct)
    finally:
        assoc.release()
    assert status == 0xC000, status
    assert listener.query(
        "SELECT count(*) FROM instances WHERE sop_instance_uid = :u", u=dataset.SOPInstanceUID
    ) == [(0,)]


@pytest.mark.parametrize("name", ["rtplan.dcm", "test-SR.dcm"])
def test_objects_models_cannot_use_are_stored_and_never_processed(
    listener: Listener, name: str
) -> None:
    ds = pydicom.dcmread(sample_file(name))
    assert storescu(listener.port, [sample_file(name)], aet=MODALITY).returncode == 0
    assert listener.query(
        "SELECT count(*) FROM instances WHERE sop_instance_uid = :u", u=ds.SOPInstanceUID
    ) == [(1,)]
    wait_for(
        lambda: (
            listener.query("SELECT state FROM studies WHERE study_uid = :u", u=ds.StudyInstanceUID)
            == [("complete",)]
        ),
        30,
        "the study to complete",
    )
    assert listener.query("SELECT count(*) FROM jobs") == [(0,)]


def test_health_fails_a_broker_that_accepts_connections_but_never_answers(
    listener: Listener, redis_server: RedisServer
) -> None:
    """A stopped redis-server (SIGSTOP: the kernel still accepts its connections) hung
    `dicomai health`, and the monitoring that runs it, for ever."""
    assert redis_server._process is not None
    redis_server._process.send_signal(signal.SIGSTOP)
    try:
        result = dicomai(
            listener.config,
            "health",
            check=False,
            env={"DICOMAI_BROKER__URL": redis_server.url},
            timeout=120,
        )
    finally:
        redis_server._process.send_signal(signal.SIGCONT)
    assert result.returncode == 1, result.stdout + result.stderr
    (row,) = [line for line in result.stdout.splitlines() if line.startswith("broker")]
    assert "FAIL" in row, result.stdout


def test_metrics_count_the_embedded_workers_jobs_and_deliveries_by_outcome(
    tmp_path: Path,
) -> None:
    peers = [{"ae_title": MODALITY, "hosts": ["127.0.0.1"]}]
    metrics_port = free_port()
    daemon = Listener(tmp_path / "worker", AET, peers)
    config = daemon.config.read_text().replace(
        "embedded = false", 'embedded = true\ndevice = "cpu"'
    )
    daemon.config.write_text(
        config
        + f'[metrics]\nhost = "127.0.0.1"\nport = {metrics_port}\n'
        + f'[[destinations]]\nname = "folder"\npath = "{tmp_path / "delivered"}"\n'
    )
    daemon.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"  # type: ignore[attr-defined]
    demo = Path(__file__).parents[2] / "models" / "demo-chest-nodule"
    dicomai(daemon.config, "db", "upgrade")
    dicomai(daemon.config, "models", "register", str(demo))
    version = tomllib.loads((demo / "model.toml").read_text())["version"]
    dicomai(daemon.config, "models", "activate", "demo-chest-nodule", version)
    radiograph = write_dicom_images(tmp_path / "in", 2, seed=5, size=256)[0]
    with daemon:
        text = metrics(daemon)
        for state in ("done", "failed", "retrying"):
            assert f'dicomai_jobs_total{{state="{state}"}} 0.0' in text, text
        for outcome in ("sent", "failed", "retrying"):
            assert f'dicomai_deliveries_total{{outcome="{outcome}"}} 0.0' in text, text
        assert storescu(daemon.port, [radiograph.path], aet=MODALITY).returncode == 0
        # Counted by the worker process, served by `serve`'s endpoint.
        wait_for(
            lambda: 'dicomai_jobs_total{state="done"} 1.0' in metrics(daemon),
            180,
            "the job counted done",
            details=daemon.log,
        )
        sent = daemon.query("SELECT count(*) FROM deliveries WHERE state = 'sent'")[0][0]
        assert sent >= 1
        text = metrics(daemon)
        assert f'dicomai_deliveries_total{{outcome="sent"}} {float(sent)}' in text, text
        assert 'dicomai_deliveries_total{outcome="retrying"} 0.0' in text, text


def test_stores_from_senders_the_allow_list_does_not_name_share_one_label(
    tmp_path: Path,
) -> None:
    """With `allow_any` a hostile sender could make a label series per title it invents."""
    metrics_port = free_port()
    peers = [{"ae_title": MODALITY, "hosts": ["127.0.0.1"]}]
    daemon = Listener(tmp_path / "any", AET, peers, allow_any=True)
    daemon.config.write_text(
        daemon.config.read_text() + f'[metrics]\nhost = "127.0.0.1"\nport = {metrics_port}\n'
    )
    daemon.metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"  # type: ignore[attr-defined]
    source = pydicom.dcmread(sample_file("CT_small.dcm"))
    with daemon:
        for number, calling in enumerate((MODALITY, "FORGED-1", "FORGED-2")):
            ae = AE(ae_title=calling)
            ae.add_requested_context(source.SOPClassUID, source.file_meta.TransferSyntaxUID)
            assoc = ae.associate("127.0.0.1", daemon.port, ae_title=AET)
            assert assoc.is_established, calling
            try:
                source.SOPInstanceUID = f"{source.StudyInstanceUID}.{number}"
                assert assoc.send_c_store(source).Status == 0x0000
            finally:
                assoc.release()
        text = metrics(daemon)
    assert 'dicomai_stores_total{calling_ae="MODALITY",status="0x0000"} 1.0' in text, text
    assert 'dicomai_stores_total{calling_ae="other",status="0x0000"} 2.0' in text, text
    assert "FORGED" not in text, text
