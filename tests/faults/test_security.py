"""No one gets in who is not on the allow-list (or lacks a certificate from our CA), patient data
stays out of the logs, and what is stored is readable by the service user only."""

from __future__ import annotations

import stat
import subprocess
from pathlib import Path

import pydicom
import pytest
from daemon import Listener, any_modality_package, dicomai
from faultkit import AET, make_ca, make_cert, make_dated_cert, make_stack
from pynetdicom import AE
from servers import sample_file, storescu, wait_for

CT = "1.2.840.10008.5.1.4.1.1.2"
REMOTE = "REMOTE"


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory):
    """A listener allowing MODALITY from this host, and REMOTE only from another network."""
    peers = [
        {"ae_title": "MODALITY", "hosts": ["127.0.0.1"]},
        {"ae_title": REMOTE, "hosts": ["10.9.0.0/16"]},
    ]
    with Listener(tmp_path_factory.mktemp("guarded"), AET, peers) as daemon:
        yield daemon


def associates(port: int, calling: str, called: str) -> bool:
    ae = AE(ae_title=calling)
    ae.add_requested_context(CT)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    established = assoc.is_established
    if established:
        status = assoc.send_c_store(pydicom.dcmread(sample_file("CT_small.dcm")))
        assert status.Status == 0
        assoc.release()
    return established


@pytest.mark.parametrize(
    ("calling", "called", "allowed"),
    [
        (REMOTE, AET, False),  # an allowed title from an address not allowed for it
        ("MODALITY", "OTHER", False),  # calling someone else's AE title on our port
        ("MODALITY", AET.lower(), False),  # AE titles are case-sensitive (PS3.5 6.2)
        ("modality", AET, False),
        ("MODALITYX", AET, False),  # no prefix matching
        ("MODALIT", AET, False),
        ("MOD ALITY", AET, False),
        ("MODALITY   ", AET, True),  # trailing spaces are padding (PS3.5 6.2: AE)
        ("  MODALITY", AET, True),  # so are leading spaces
        ("MODALITY", f"  {AET}  ", True),
    ],
)
def test_allow_list_holds_against_spoofed_and_padded_titles(
    guarded: Listener, calling: str, called: str, allowed: bool
) -> None:
    before = guarded.query("SELECT count(*) FROM audit_events WHERE action = :a", a=REJECTED)
    assert associates(guarded.port, calling, called) == allowed
    after = guarded.query("SELECT count(*) FROM audit_events WHERE action = :a", a=REJECTED)
    assert after[0][0] - before[0][0] == (0 if allowed else 1)


REJECTED = "association.rejected"


def test_rejected_callers_store_nothing(guarded: Listener) -> None:
    stored_by = {row[0] for row in guarded.query("SELECT DISTINCT calling_ae FROM instances")}
    assert stored_by <= {"MODALITY"}, stored_by


# ---------------------------------------------------------------------------------------------
# TLS


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Our CA with server and client certificates; a forged CA with the very same name."""
    folder = tmp_path_factory.mktemp("pki")
    make_ca(folder, "ca", "/CN=dicomai test CA")
    make_ca(folder, "forged-ca", "/CN=dicomai test CA")
    make_cert(folder, "server", "ca")
    make_cert(folder, "client", "ca")
    make_cert(folder, "forged", "forged-ca")
    make_ca(folder, "selfsigned", "/CN=client")
    # Signed by our CA, but its validity ended in 2020 / begins in 2099.
    make_dated_cert(folder, "expired", "ca", "20200101000000Z", "20200102000000Z")
    make_dated_cert(folder, "future", "ca", "20990101000000Z", "20990102000000Z")
    return folder


@pytest.fixture(scope="module")
def tls_listener(tmp_path_factory: pytest.TempPathFactory, pki: Path):
    peers = [{"ae_title": "MODALITY", "hosts": ["127.0.0.1"]}]
    tls = {
        "cert": str(pki / "server.crt"),
        "key": str(pki / "server.key"),
        "ca": str(pki / "ca.crt"),
        "require_client_cert": True,
    }
    daemon = Listener(tmp_path_factory.mktemp("tls"), AET, peers, tls=tls)
    with daemon.started(ready=lambda: tls_store(daemon, pki, "client").returncode == 0):
        yield daemon


def tls_store(
    daemon: Listener, pki: Path, client: str, aet: str = "MODALITY"
) -> subprocess.CompletedProcess:
    args = ["+tls", str(pki / f"{client}.key"), str(pki / f"{client}.crt")]
    return storescu(
        daemon.port,
        [sample_file("MR_small.dcm")],
        aet=aet,
        aec=AET,
        extra_args=[*args, "+cf", str(pki / "ca.crt")],
        timeout=60,
    )


@pytest.mark.parametrize(
    ("client", "aet"),
    [
        ("forged", "MODALITY"),  # signed by a CA that only borrows our CA's name
        ("selfsigned", "MODALITY"),  # a self-signed certificate with the client's name
        ("expired", "MODALITY"),  # our CA signed it, but it has expired
        ("future", "MODALITY"),  # our CA signed it, but it is not valid yet
        ("client", "INTRUDER"),  # a good certificate does not replace the allow-list
    ],
)
def test_tls_refuses_what_our_ca_did_not_sign_and_callers_not_on_the_list(
    tls_listener: Listener, pki: Path, client: str, aet: str
) -> None:
    before = tls_listener.query("SELECT count(*) FROM instances")
    result = tls_store(tls_listener, pki, client, aet)
    assert result.returncode != 0, f"{client}/{aet} got through:\n{result.stderr}"
    assert tls_listener.query("SELECT count(*) FROM instances") == before


# ---------------------------------------------------------------------------------------------
# A full run: patient data never in logs, private files, an intact audit chain

SAMPLES = ["CT_small.dcm", "MR_small.dcm", "examples_rgb_color.dcm", "rtplan.dcm", "test-SR.dcm"]


def patient_values(paths: list[Path]) -> set[str]:
    values = set()
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        for keyword in ("PatientName", "PatientID", "PatientBirthDate"):
            value = str(ds.get(keyword, "") or "").strip()
            if len(value) >= 4:
                values.add(value)
                values.update(part for part in value.split("^") if len(part) >= 4)
    return values


def test_full_run_keeps_patient_data_out_of_logs_files_private_and_audit_chain_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    samples = [sample_file(name) for name in SAMPLES]
    # One-component names make highdicom warn with the name quoted; these hold a quote and a
    # newline, which a lazy pattern let through in part.
    for number, name in enumerate(['ZZ"LEAKQUOTE', "ZZLEAK\nNEWLINE"]):
        crafted = pydicom.dcmread(sample_file("CT_small.dcm"))
        crafted.PatientName = name
        crafted.StudyInstanceUID = f"{crafted.StudyInstanceUID}.7{number}"
        crafted.SOPInstanceUID = f"{crafted.SOPInstanceUID}.7{number}"
        crafted.save_as(tmp_path / f"crafted{number}.dcm")
        samples.append(tmp_path / f"crafted{number}.dcm")
    monkeypatch.setenv("DICOMAI_LOG_LEVEL", "DEBUG")  # the most a site could log
    stack = make_stack(
        tmp_path / "stack",
        embedded_worker=True,
        models=(any_modality_package(tmp_path),),
        destinations=[{"name": "folder", "path": str(tmp_path / "results")}],
    )
    stack.serve()
    try:
        result = storescu(stack.port, samples, aet="STORESCU")
        assert result.returncode == 0, result.stderr
        # A refused sender's audit row carries its title, never patient data.
        storescu(stack.port, samples[:1], aet="STRANGER")
        wait_for(
            lambda: (
                stack.scalar("SELECT count(*) FROM jobs WHERE state IN ('queued', 'running')") == 0
                and stack.scalar("SELECT count(*) FROM jobs WHERE state = 'done'") >= 4
                and stack.scalar("SELECT count(*) FROM deliveries WHERE state = 'pending'") == 0
            ),
            120,
            "jobs done and delivered",
            details=stack.logs,
        )
        assert stack.scalar("SELECT count(*) FROM jobs WHERE state = 'failed'") == 0
    finally:
        stack.stop()

    values = patient_values(samples) | {"LEAKQUOTE", "NEWLINE"}
    assert values, "the samples carry no patient data to look for"
    logs = {p.name: p.read_text(errors="replace") for p in stack.root.glob("*.log")}
    assert sum(len(text) for text in logs.values()) > 1000, "suspiciously empty logs"
    for name, text in logs.items():
        for value in values:
            assert value not in text, f"patient data {value!r} in {name}"

    private = [stack.spool(), stack.storage / "outputs"]
    for folder in private:
        for path in [folder, *folder.rglob("*")]:
            mode = stat.S_IMODE(path.stat().st_mode)
            wanted = 0o700 if path.is_dir() else 0o600
            assert mode == wanted, f"{path} has mode {mode:o}, not {wanted:o}"
    # The folder destination's copies carry patient data too: not readable by every user.
    delivered = [tmp_path / "results", *(tmp_path / "results").rglob("*")]
    assert len(delivered) > 1, "nothing was delivered to the folder"
    for path in delivered:
        mode = stat.S_IMODE(path.stat().st_mode)
        wanted = 0o750 if path.is_dir() else 0o640
        assert mode == wanted, f"{path} has mode {mode:o}, not {wanted:o}"
    database = Path(stack.db_url.removeprefix("sqlite:///"))
    for path in database.parent.glob(database.name + "*"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, f"{path} is not 0600"

    verify = dicomai(stack.config, "audit", "verify")
    assert verify.returncode == 0, verify.stdout + verify.stderr
