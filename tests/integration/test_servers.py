"""The test servers and DICOM tools of ``tests/servers.py`` work against the real programs."""

from __future__ import annotations

import io
import socket
from pathlib import Path

import psycopg
import pydicom
import pytest
from servers import (
    SAMPLE_FILES,
    OrthancServer,
    PostgresServer,
    RedisServer,
    dciodvfy,
    echoscu,
    free_port,
    require_program,
    sample_file,
    sample_files,
    storescu,
    wait_for,
)


def test_free_port_can_be_bound() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_wait_for_returns_first_truthy_value_and_names_what_timed_out() -> None:
    calls = iter([None, 0, "ready"])
    assert wait_for(lambda: next(calls), 5, "the third call") == "ready"

    with pytest.raises(pytest.fail.Exception, match=r"waiting for the moon.*boom"):
        wait_for(lambda: (_ for _ in ()).throw(OSError("boom")), 0.05, "the moon")


def test_missing_program_fails_naming_the_package() -> None:
    with pytest.raises(pytest.fail.Exception, match="apt-get install -y no-such-package"):
        require_program("no-such-program-dicomai", "no-such-package")


def test_storescu_sends_a_ct_that_orthanc_stores(orthanc: OrthancServer) -> None:
    ct = sample_file("CT_small.dcm")

    result = storescu(orthanc.dicom_port, [ct], aec=orthanc.aet)

    assert result.returncode == 0, result.stdout + result.stderr
    assert orthanc.count_instances() == 1
    sop_uid = pydicom.dcmread(ct).SOPInstanceUID
    (orthanc_id,) = orthanc.instances()
    assert orthanc.find_sop_instance(sop_uid) == orthanc_id
    assert orthanc.instance_tags(orthanc_id)["SOPInstanceUID"] == sop_uid
    stored = pydicom.dcmread(io.BytesIO(orthanc.instance_file(orthanc_id)))
    assert stored.SOPInstanceUID == sop_uid


def test_orthanc_fixture_starts_empty_and_answers_echo(orthanc: OrthancServer) -> None:
    assert orthanc.count_instances() == 0
    assert orthanc.find_sop_instance("1.2.3.4.5") is None

    result = echoscu(orthanc.dicom_port, aec=orthanc.aet)

    assert result.returncode == 0, result.stdout + result.stderr


def test_orthanc_takes_uploads_and_compressed_files(orthanc: OrthancServer) -> None:
    plan = sample_file("rtplan.dcm")
    orthanc_id = orthanc.upload_instance(plan.read_bytes())
    assert orthanc.instances() == [orthanc_id]

    j2k = storescu(
        orthanc.dicom_port, sample_files(["JPEG2000.dcm", "CT_small.dcm"]), extra_args=["-xw"]
    )
    rle = storescu(orthanc.dicom_port, [sample_file("MR_small_RLE.dcm")], extra_args=["-xr"])

    assert j2k.returncode == 0, j2k.stdout + j2k.stderr
    assert rle.returncode == 0, rle.stdout + rle.stderr
    assert orthanc.count_instances() == 4


def test_redis_answers_ping_and_keeps_appended_data_over_a_restart(
    redis_server: RedisServer,
) -> None:
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"
    with redis_server.client() as client:
        assert client.ping()
        client.set("study", "1.2.3")

    redis_server.restart()

    with redis_server.client() as client:
        assert client.get("study") == b"1.2.3"


def test_redis_comes_back_after_a_kill(redis_server: RedisServer) -> None:
    port = redis_server.port
    redis_server.kill()

    redis_server.start()

    assert redis_server.port == port
    with redis_server.client() as client:
        assert client.ping()


def test_postgres_database_holds_rows(postgres_url: str) -> None:
    assert postgres_url.startswith("postgresql://postgres@127.0.0.1:")
    with psycopg.connect(postgres_url) as conn:
        conn.execute("CREATE TABLE job (id serial PRIMARY KEY, study_uid text NOT NULL)")
        conn.execute("INSERT INTO job (study_uid) VALUES (%s), (%s)", ("1.2.3", "1.2.4"))
        rows = conn.execute("SELECT study_uid FROM job ORDER BY id").fetchall()

    assert rows == [("1.2.3",), ("1.2.4",)]


def test_postgres_databases_are_separate(
    postgres_server: PostgresServer, postgres_url: str
) -> None:
    other = postgres_server.create_database("test_other_servers")
    try:
        with psycopg.connect(other) as conn:
            conn.execute("CREATE TABLE job (id int)")
        with psycopg.connect(postgres_url) as conn:
            tables = conn.execute("SELECT tablename FROM pg_tables WHERE tablename = 'job'")
            assert tables.fetchall() == []
    finally:
        postgres_server.drop_database("test_other_servers")


def test_dciodvfy_passes_a_sample_file_with_warnings_only() -> None:
    verification = dciodvfy(sample_file("CT_small.dcm"))

    assert verification.ok, verification.output
    assert "CTImage" in verification.output
    assert verification.errors == []
    assert verification.warnings


def test_dciodvfy_fails_a_file_without_sop_class(tmp_path: Path) -> None:
    dataset = pydicom.dcmread(sample_file("CT_small.dcm"))
    del dataset.SOPClassUID
    broken = tmp_path / "broken.dcm"
    dataset.save_as(broken)

    ok, output = dciodvfy(broken)

    assert not ok
    assert "missing SOPClassUID" in output


def test_dciodvfy_fails_an_unreadable_file(tmp_path: Path) -> None:
    verification = dciodvfy(tmp_path / "absent.dcm")

    assert not verification.ok
    assert any(line.startswith("Abort - ") for line in verification.errors)


@pytest.mark.parametrize("name", sorted(SAMPLE_FILES))
def test_sample_file_ships_with_pydicom(name: str) -> None:
    assert pydicom.dcmread(sample_file(name)).SOPClassUID


def test_sample_file_not_in_the_wheel_fails_without_downloading() -> None:
    with pytest.raises(pytest.fail.Exception, match="does not ship"):
        sample_file("SC_rgb.dcm")


def test_a_server_that_dies_on_start_fails_with_its_log(tmp_path: Path) -> None:
    broken = OrthancServer(tmp_path, StorageDirectory="/proc/not-a-folder")

    with pytest.raises(pytest.fail.Exception, match=r"Orthanc exited(.|\n)*orthanc\.log"), broken:
        pass
