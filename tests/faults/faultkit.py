"""What the fault tests share: a dicomai stack on disk, studies to send, servers to break."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom
import pytest
import servers
from daemon import REPO, Daemon, dicomai, write_config
from pynetdicom import AE
from servers import OrthancServer, PostgresServer, free_port, spawn, stop_process, wait_for
from sqlalchemy import create_engine, text

from dicomai.training.synthetic import write_dicom_images

AET = "DICOMAI"
SENDER = "MODALITY"
PEERS = [
    {"ae_title": SENDER, "hosts": ["127.0.0.1"]},
    {"ae_title": "STORESCU", "hosts": ["127.0.0.1"]},
]
DEMO = REPO / "models" / "demo-chest-nodule"
DX = "1.2.840.10008.5.1.4.1.1.1.1"


def one_study(folder: Path, n: int, seed: int, size: int = 128) -> list[Path]:
    """`n` synthetic DX images of one study (write_dicom_images makes one study per image)."""
    written = write_dicom_images(folder, n, seed=seed, size=size)
    study = written[0].study_uid
    for image in written[1:]:
        ds = pydicom.dcmread(image.path)
        ds.StudyInstanceUID = study
        ds.save_as(image.path, enforce_file_format=True)
    return [w.path for w in written]


def sop_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class Stack:
    """A dicomai configuration with its database, and the processes started on it."""

    root: Path
    config: Path
    port: int
    db_url: str
    storage: Path
    processes: list[Daemon] = field(default_factory=list)

    def serve(self) -> Daemon:
        daemon = Daemon(self.config, self.root / "serve.log")
        daemon.start()
        self.processes.append(daemon)
        daemon.wait_listening(self.port, SENDER, AET)
        return daemon

    def worker(self, name: str = "worker") -> Daemon:
        daemon = Daemon(self.config, self.root / f"{name}.log", command="worker")
        daemon.start()
        self.processes.append(daemon)
        return daemon

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop()
        self.processes.clear()

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name} ---\n{p.read_text(errors='replace')[-4000:]}"
            for p in sorted(self.root.glob("*.log"))
        )

    def query(self, sql: str, **params: object) -> list[tuple[Any, ...]]:
        engine = create_engine(self.db_url.replace("postgresql://", "postgresql+psycopg://"))
        try:
            with engine.connect() as connection:
                return [tuple(row) for row in connection.execute(text(sql), params)]
        finally:
            engine.dispose()

    def scalar(self, sql: str, **params: object) -> Any:
        return self.query(sql, **params)[0][0]

    def spool(self) -> Path:
        return self.storage / "spool"

    def spool_files(self) -> list[Path]:
        return sorted(p for p in self.spool().rglob("*") if p.is_file())

    def wait_jobs_done(self, count: int, timeout: float) -> None:
        def done() -> bool:
            states = dict(self.query("SELECT state, count(*) FROM jobs GROUP BY state"))
            assert not states.get("failed"), f"failed jobs: {states}\n{self.logs()}"
            return states.get("done", 0) >= count

        wait_for(done, timeout, f"{count} jobs done", details=self.logs)


def make_stack(
    root: Path,
    *,
    db_url: str | None = None,
    broker_url: str | None = None,
    embedded_worker: bool = False,
    models: tuple[Path, ...] = (),
    destinations: list[dict[str, Any]] | None = None,
    **tables: dict[str, Any],
) -> Stack:
    """Write a config (our AE on a free port, `PEERS` allowed), upgrade, register and activate
    `models`. `tables` add or override keys per section (`ingest={...}`, `worker={...}`)."""
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    storage = root / "var"
    db_url = db_url or f"sqlite:///{root / 'dicomai.db'}"
    sections: dict[str, dict[str, Any]] = {
        "ingest": {"ae_title": AET, "host": "127.0.0.1", "port": port, "study_quiet_seconds": 1.0},
        "storage": {"dir": str(storage), "min_free_mb": 0},
        "database": {"url": db_url},
        "worker": {"embedded": embedded_worker, "device": "cpu"},
        "delivery": {"backoff_initial_seconds": 0.5, "backoff_max_seconds": 2.0},
    }
    if broker_url:
        sections["broker"] = {"url": broker_url}
    for name, values in tables.items():
        sections.setdefault(name, {}).update(values)
    config = write_config(
        root / "dicomai.toml",
        sections,
        {"ingest.peers": PEERS, "destinations": destinations or []},
    )
    dicomai(config, "db", "upgrade")
    for package in models:
        dicomai(config, "models", "register", str(package))
        name = "demo-chest-nodule" if package == DEMO else package.name
        dicomai(config, "models", "activate", name, "1.0.0")
    return Stack(root, config, port, db_url, Path(sections["storage"]["dir"]))


@contextmanager
def association(port: int, contexts: list[tuple[str, str]], aet: str = SENDER) -> Iterator[Any]:
    ae = AE(ae_title=aet)
    for sop_class, syntax in contexts:
        ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title=AET)
    assert assoc.is_established, "association refused"
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()


def store_status(port: int, path_or_ds: Any, sop_class: str = DX) -> int | None:
    """Send one instance over its own association; the status, or None if there was none."""
    syntax = "1.2.840.10008.1.2.1"
    if isinstance(path_or_ds, Path):
        syntax = str(
            pydicom.dcmread(path_or_ds, stop_before_pixels=True).file_meta.TransferSyntaxUID
        )
    with association(port, [(sop_class, syntax)]) as assoc:
        status = assoc.send_c_store(path_or_ds)
    return int(status.Status) if status and "Status" in status else None


def rss_kb(pid: int) -> int:
    """Resident set size of a process, from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class RestartablePostgres(PostgresServer):
    """A PostgresServer that can go down and come back on the same data and port."""

    def halt(self) -> None:
        """Fast shutdown (SIGINT): sessions are cut, the data stays."""
        assert self._process is not None
        stop_process(self._process, sig=signal.SIGINT)
        self._process = None

    def resume(self) -> None:
        postgres = servers.postgres_program("postgres")
        self._process = spawn(
            [postgres, "-D", str(self.data_dir)],
            self.log_path,
            user=self._owner,
            parent_death_signal=signal.SIGINT,
        )
        wait_for(
            lambda: self.connect(connect_timeout=2).close() is None,
            60,
            "PostgreSQL back",
            ignore=(OSError, Exception),
        )


class PinnedOrthanc(OrthancServer):
    """An Orthanc that comes back on the same ports after a stop (OrthancServer.start picks
    new free ports each time; a destination in a config file must keep its address)."""

    def start(self) -> None:
        if not (self.dicom_port and self.http_port):
            super().start()
            return
        ports = iter((self.dicom_port, self.http_port))
        original = servers.free_port
        servers.free_port = lambda: next(ports)
        try:
            super().start()
        finally:
            servers.free_port = original


def openssl(*args: str, cwd: Path) -> None:
    binary = servers.require_program("openssl", "openssl")
    result = subprocess.run([binary, *args], cwd=cwd, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        pytest.fail(f"openssl {' '.join(args)} failed: {result.stderr}")


def make_ca(folder: Path, key_name: str, subject: str) -> None:
    openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", subject,
        "-keyout", f"{key_name}.key", "-out", f"{key_name}.crt", cwd=folder,
    )  # fmt: skip


def _client_request(folder: Path, name: str) -> None:
    """A key and a certificate signing request with CN=client, as `name`.key/.csr."""
    openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=client",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", cwd=folder,
    )  # fmt: skip


def make_cert(folder: Path, name: str, ca: str) -> None:
    """A client certificate (CN=client) for `name`, signed by CA `ca`."""
    (folder / f"{name}.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _client_request(folder, name)
    openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
        "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.crt",
        cwd=folder,
    )  # fmt: skip


def make_dated_cert(folder: Path, name: str, ca: str, start: str, end: str) -> None:
    """A client certificate signed by `ca`, valid only from `start` to `end` (YYYYMMDDHHMMSSZ).

    `openssl x509 -req` only counts days forward from now; `openssl ca` takes explicit dates.
    """
    (folder / f"{name}.cnf").write_text(
        "[ca]\ndefault_ca = test\n"
        f"[test]\ndatabase = {name}.index\nnew_certs_dir = .\nserial = {name}.serial\n"
        "default_md = sha256\npolicy = anything\ncopy_extensions = none\n"
        "[anything]\ncommonName = supplied\n"
    )
    (folder / f"{name}.index").write_text("")
    (folder / f"{name}.serial").write_text("1000\n")
    _client_request(folder, name)
    openssl(
        "ca", "-batch", "-config", f"{name}.cnf", "-cert", f"{ca}.crt", "-keyfile", f"{ca}.key",
        "-in", f"{name}.csr", "-out", f"{name}.crt", "-startdate", start, "-enddate", end,
        "-notext",
        cwd=folder,
    )  # fmt: skip


def kill9(daemon: Daemon) -> None:
    assert daemon.process is not None
    os.kill(daemon.process.pid, signal.SIGKILL)
    daemon.process.wait(15)
    daemon.process = None
