"""DICOM TLS: dcmtk storescu +tls against `dicomai serve`, with a test CA made by the fixture."""

from __future__ import annotations

import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from daemon import Listener, dicomai
from servers import echoscu, require_program, sample_copies, sample_file, storescu, wait_for

AET = "DICOMAI"
MODALITY = "MODALITY"


def openssl(*args: str, cwd: Path) -> None:
    binary = require_program("openssl", "openssl")
    result = subprocess.run([binary, *args], cwd=cwd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        pytest.fail(f"openssl {' '.join(args)} failed: {result.stderr}")


def make_ca(folder: Path, name: str) -> None:
    openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        f"/CN={name}",
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.crt",
        cwd=folder,
    )


def make_cert(folder: Path, name: str, ca: str) -> None:
    (folder / f"{name}.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        f"/CN={name}",
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.csr",
        cwd=folder,
    )
    openssl(
        "x509",
        "-req",
        "-in",
        f"{name}.csr",
        "-CA",
        f"{ca}.crt",
        "-CAkey",
        f"{ca}.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        f"{name}.ext",
        "-out",
        f"{name}.crt",
        cwd=folder,
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A test CA with server and client certificates, and a rogue CA with its own client."""
    folder = tmp_path_factory.mktemp("pki")
    make_ca(folder, "ca")
    make_ca(folder, "rogue-ca")
    make_cert(folder, "server", "ca")
    make_cert(folder, "client", "ca")
    make_cert(folder, "rogue", "rogue-ca")
    return folder


@pytest.fixture(scope="module")
def tls_listener(tmp_path_factory: pytest.TempPathFactory, pki: Path):
    peers = [{"ae_title": MODALITY, "hosts": ["127.0.0.1"]}]
    root = tmp_path_factory.mktemp("tls")
    tls = {
        "cert": str(pki / "server.crt"),
        "key": str(pki / "server.key"),
        "ca": str(pki / "ca.crt"),
        "require_client_cert": True,
    }
    daemon = Listener(root, AET, peers, tls=tls)
    with daemon.started(ready=lambda: tls_store(daemon, pki, "client").returncode == 0):
        yield daemon


def tls_store(daemon: Listener, pki: Path, client: str | None) -> subprocess.CompletedProcess:
    args = ["+tls", str(pki / f"{client}.key"), str(pki / f"{client}.crt")] if client else ["+tla"]
    return storescu(
        daemon.port,
        [sample_file("CT_small.dcm")],
        aet=MODALITY,
        aec=AET,
        extra_args=[*args, "+cf", str(pki / "ca.crt")],
        timeout=60,
    )


def test_store_over_tls_with_a_client_certificate(tls_listener: Listener, pki: Path) -> None:
    result = tls_store(tls_listener, pki, "client")
    assert result.returncode == 0, result.stderr
    assert tls_listener.query("SELECT count(*) FROM instances") == [(1,)]


def tls_refusals(daemon: Listener) -> list[str]:
    rows = daemon.query(
        "SELECT detail FROM audit_events WHERE action = 'association.rejected' ORDER BY id"
    )
    return [str(detail) for (detail,) in rows if "TLS handshake" in str(detail)]


@pytest.mark.parametrize(
    ("client", "reason"),
    [(None, "certificate"), ("rogue", "client certificate unable to get local issuer")],
    ids=["no-certificate", "another-ca"],
)
def test_a_client_refused_in_the_handshake_is_audited_and_logged(
    tls_listener: Listener, pki: Path, client: str | None, reason: str
) -> None:
    before = len(tls_refusals(tls_listener))
    assert tls_store(tls_listener, pki, client).returncode != 0
    # The client may give up (TLS 1.3: once it sent its certificate) before the listener's
    # connection thread has written its row.
    refusals = wait_for(
        lambda: tls_refusals(tls_listener)[before:], 30, "the refused handshake's audit row"
    )
    assert len(refusals) == 1 and reason in refusals[0], refusals
    wait_for(
        lambda: "connection refused: TLS handshake failed" in tls_listener.log(),
        30,
        "the refusal's log line",
    )


def test_a_connection_that_never_shakes_hands_blocks_no_other_sender(
    tls_listener: Listener, pki: Path
) -> None:
    """pynetdicom shook hands on the thread that accepts connections: one idle socket
    stopped every TLS sender until it closed."""
    with socket.create_connection(("127.0.0.1", tls_listener.port)):  # says nothing
        result = tls_store(tls_listener, pki, "client")
        assert result.returncode == 0, result.stderr
        health = dicomai(tls_listener.config, "health", check=False)
        assert "C-ECHO answered over TLS" in health.stdout, health.stdout


def test_health_echoes_the_listener_over_tls(tls_listener: Listener) -> None:
    # The TLS listener takes no plain connection: health must call it as a TLS client.
    result = dicomai(tls_listener.config, "health", check=False)
    assert "C-ECHO answered over TLS" in result.stdout, result.stdout + result.stderr


def test_plain_tcp_sender_gets_nothing_stored(tls_listener: Listener) -> None:
    before = tls_listener.spool_files()
    result = storescu(
        tls_listener.port, [sample_file("MR_small.dcm")], aet=MODALITY, aec=AET, timeout=60
    )
    assert result.returncode != 0
    assert tls_listener.spool_files() == before


def test_concurrent_tls_senders_are_served_by_every_listener_process(
    tmp_path: Path, pki: Path
) -> None:
    peers = [{"ae_title": MODALITY, "hosts": ["127.0.0.1"]}]
    tls = {"cert": str(pki / "server.crt"), "key": str(pki / "server.key")}
    files = sample_copies("CT_small.dcm", tmp_path, 4, "1.2.826.0.1.78")
    daemon = Listener(tmp_path / "multi", AET, peers, tls=tls, listener_processes=2)
    with daemon.started(ready=lambda: daemon.log().count("listening as") == 2):
        # Four at once: the processes take two each from their one socket, and each wraps
        # its own connections in TLS.
        with ThreadPoolExecutor(4) as pool:
            results = list(
                pool.map(
                    lambda file: storescu(
                        daemon.port,
                        [file],
                        aet=MODALITY,
                        aec=AET,
                        extra_args=["+tla", "+cf", str(pki / "ca.crt")],
                        timeout=60,
                    ),
                    files,
                )
            )
        assert [r.returncode for r in results] == [0, 0, 0, 0], [r.stderr for r in results]
        assert daemon.query("SELECT count(*) FROM instances") == [(4,)]


@pytest.mark.parametrize(
    ("tls", "message"),
    [
        ({"key": "server.key", "require_client_cert": True}, "ingest.tls.cert is required"),
        ({"cert": "server.crt", "key": "missing.key"}, "ingest.tls.key: cannot read"),
        ({"cert": "server.crt", "key": "server.key", "ca": "nowhere.crt"}, "ingest.tls.ca:"),
        ({"cert": "server.crt", "key": "encrypted.key"}, "is encrypted"),
    ],
    ids=["no-cert", "missing-key", "missing-ca", "encrypted-key"],
)
def test_tls_settings_that_cannot_work_stop_serve_with_one_line(
    tmp_path: Path, pki: Path, tls: dict[str, object], message: str
) -> None:
    if not (pki / "encrypted.key").exists():
        openssl(
            "pkey",
            "-in",
            "server.key",
            "-aes256",
            "-passout",
            "pass:x",
            "-out",
            "encrypted.key",
            cwd=pki,
        )
    settings = {k: str(pki / v) if isinstance(v, str) else v for k, v in tls.items()}
    daemon = Listener(tmp_path, AET, [{"ae_title": MODALITY, "hosts": ["127.0.0.1"]}], tls=settings)
    dicomai(daemon.config, "db", "upgrade")
    result = dicomai(daemon.config, "serve", check=False, timeout=60)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and message in lines[0], result.stderr


def test_port_checks_on_the_tls_port_are_not_refusals(tls_listener: Listener) -> None:
    """A load balancer's or monitoring's connect-and-close, every few seconds."""
    before, lines = len(tls_refusals(tls_listener)), len(tls_listener.log().splitlines())
    for _ in range(3):
        socket.create_connection(("127.0.0.1", tls_listener.port)).close()
    # Health takes seconds: a refusal of the port checks would be written by then.
    health = dicomai(tls_listener.config, "health", check=False)
    assert "C-ECHO answered over TLS" in health.stdout, health.stdout
    assert len(tls_refusals(tls_listener)) == before
    assert "TLS handshake" not in "".join(tls_listener.log().splitlines()[lines:])


def test_a_sender_without_tls_on_the_tls_port_is_told_apart(tls_listener: Listener) -> None:
    # Audited as "wrong_version_number", which no administrator could act on.
    before = len(tls_refusals(tls_listener))
    assert echoscu(tls_listener.port, aet=MODALITY, aec=AET, timeout=10).returncode != 0
    refusals = wait_for(
        lambda: tls_refusals(tls_listener)[before:], 30, "the plain sender's audit row"
    )
    assert "the peer does not speak TLS" in refusals[0], refusals


def test_a_connection_silent_until_the_timeout_leaves_no_audit_row(
    tmp_path: Path, pki: Path
) -> None:
    # Anyone able to reach the port grew the audit trail by a row per silent connection.
    peers = [{"ae_title": MODALITY, "hosts": ["127.0.0.1"]}]
    tls = {"cert": str(pki / "server.crt"), "key": str(pki / "server.key")}
    daemon = Listener(tmp_path / "quiet", AET, peers, tls=tls, network_timeout_seconds=1)
    with daemon.started(ready=lambda: tls_store(daemon, pki, "client").returncode == 0):
        silent = [socket.create_connection(("127.0.0.1", daemon.port)) for _ in range(3)]
        time.sleep(3)  # past the handshake's timeout
        for connection in silent:
            connection.close()
        assert tls_store(daemon, pki, "client").returncode == 0
        assert tls_refusals(daemon) == []


def test_a_renegotiation_is_refused_audited_and_logged_in_one_line(
    tls_listener: Listener, pki: Path
) -> None:
    # A TLS 1.2 peer asking to renegotiate was refused by OpenSSL, and pynetdicom logged the
    # error with a traceback and left no audit row.
    lines = len(tls_listener.log().splitlines())
    argv = ["openssl", "s_client", "-tls1_2", "-connect", f"127.0.0.1:{tls_listener.port}"]
    argv += ["-cert", str(pki / "client.crt"), "-key", str(pki / "client.key")]
    client = subprocess.Popen(
        [*argv, "-CAfile", str(pki / "ca.crt")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert client.stdin is not None and client.stdout is not None
        wait_for(lambda: "Verify return code" in (client.stdout.readline() or "x"), 30, "TLS")
        client.stdin.write("R\n")  # s_client: renegotiate
        client.stdin.flush()
        aborted = wait_for(
            lambda: tls_listener.query(
                "SELECT detail FROM audit_events WHERE action = 'association.aborted' "
                "AND detail LIKE '%TLS error%'"
            ),
            30,
            "the renegotiation's audit row",
        )
    finally:
        client.kill()
        client.communicate()
    assert "HANDSHAKE_FAILURE" in str(aborted[0][0]), aborted  # the peer's alert, named
    new = tls_listener.log().splitlines()[lines:]
    assert not [line for line in new if "Traceback" in line], "\n".join(new)
    assert tls_store(tls_listener, pki, "client").returncode == 0
