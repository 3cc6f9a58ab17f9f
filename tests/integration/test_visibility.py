"""What an administrator sees: Prometheus metrics, `dicomai health`, non-image objects kept."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pydicom
import pytest
from daemon import Listener, dicomai
from servers import free_port, sample_file, storescu, wait_for

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


def test_health_reports_every_check_and_fails_when_the_database_is_gone(
    listener: Listener, tmp_path: Path
) -> None:
    ok = dicomai(listener.config, "health", check=False)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    for check in ("database", "broker", "spool", "listener"):
        assert check in ok.stdout
    broken = dicomai(
        listener.config,
        "health",
        check=False,
        env={"DICOMAI_DATABASE__URL": f"sqlite:///{tmp_path / 'none' / 'x.db'}"},
    )
    assert broken.returncode == 1
    assert "FAIL" in broken.stdout


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
