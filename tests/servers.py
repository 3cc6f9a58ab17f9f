"""Real servers and DICOM tools for tests: Orthanc, redis-server, PostgreSQL, dcmtk, dicom3tools.

Each server is a small class that starts the real program on free loopback ports in a folder of
its own, waits by polling until it answers, and stops it again; ``tests/conftest.py`` turns them
into fixtures. A missing program fails the test with the Debian package to install, never skips.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple, Self, TypeVar

import psycopg
import pydicom
import pytest
import redis
from psycopg import sql
from pydicom.data import get_testdata_file

T = TypeVar("T")

LOOPBACK = "127.0.0.1"
START_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0

# pydicom sample files that ship inside the pydicom 3.0.2 wheel. Others that pydicom's docs name
# (SC_rgb.dcm, emri_small_jpeg_2k_lossless.dcm) are downloads: offline they retry for ~21 s each.
# The three MR_small* files are one instance (same SOP, series and study UIDs) in three transfer
# syntaxes; JPEG2000.dcm and JPEG-lossy.dcm are two instances of one series.
SAMPLE_FILES: dict[str, str] = {
    "CT_small.dcm": "CT 128x128 16-bit, explicit VR little endian",
    "MR_small.dcm": "MR 64x64 16-bit, explicit VR little endian",
    "MR_small_RLE.dcm": "MR_small.dcm in RLE lossless",
    "MR_small_jp2klossless.dcm": "MR_small.dcm in JPEG 2000 lossless",
    "JPEG2000.dcm": "Secondary Capture 1024 rows x 256 columns 16-bit, JPEG 2000 (.91)",
    "JPEG-lossy.dcm": "Secondary Capture 1024 rows x 256 columns 16-bit, JPEG extended (lossy)",
    "SC_rgb_small_odd.dcm": "Secondary Capture 3x3 RGB, explicit VR little endian",
    "SC_rgb_rle.dcm": "Secondary Capture 100x100 RGB, RLE lossless",
    "SC_rgb_jpeg_dcmtk.dcm": "Secondary Capture 100x100 YBR_FULL, JPEG baseline",
    "examples_rgb_color.dcm": "Ultrasound 240 rows x 320 columns RGB, explicit VR little endian",
    "rtplan.dcm": "RT Plan, implicit VR little endian, no pixel data",
    "test-SR.dcm": "Comprehensive SR, explicit VR little endian",
}


# ---------------------------------------------------------------------------------------------
# Waiting, ports, programs, processes


def free_port() -> int:
    """Return a TCP port that was free on the loopback interface a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def dropping_port() -> Iterator[int]:
    """A loopback port whose accept queue is full: the kernel drops further SYNs, as a
    firewall does, and a connection attempt waits until its own timeout."""
    listener = socket.socket()
    listener.bind((LOOPBACK, 0))
    listener.listen(0)
    port = int(listener.getsockname()[1])
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex((LOOPBACK, port))
        fillers.append(filler)
    try:
        yield port
    finally:
        for sock in [*fillers, listener]:
            sock.close()


def wait_for(
    predicate: Callable[[], T],
    timeout: float,
    what: str,
    *,
    ignore: tuple[type[BaseException], ...] = (OSError,),
    details: Callable[[], str] | None = None,
) -> T:
    """Poll ``predicate`` until it returns something truthy, failing the test at the deadline.

    Parameters
    ----------
    predicate
        Called repeatedly; its first truthy result is returned.
    timeout
        Seconds before the test fails.
    what
        What is awaited, for the failure message ("Orthanc HTTP on port 8042").
    ignore
        Exceptions raised by ``predicate`` that count as "not yet"; any other propagates.
    details
        Called on failure; its text (a server log's tail) is appended to the message.

    Raises
    ------
    pytest.fail.Exception
        When the deadline passes.
    """
    deadline = time.monotonic() + timeout
    interval = 0.005
    last_error: BaseException | None = None
    while True:
        try:
            result = predicate()
        except ignore as exc:
            last_error = exc
        else:
            if result:
                return result
        if time.monotonic() >= deadline:
            break
        time.sleep(min(interval, max(deadline - time.monotonic(), 0)))
        interval = min(interval * 2, 0.1)
    message = f"timed out after {timeout:g} s waiting for {what}"
    if last_error is not None:
        message += f"; last error: {last_error!r}"
    if details is not None:
        message += f"\n{details()}"
    pytest.fail(message, pytrace=False)


def require_program(name: str, package: str, extra_dirs: Sequence[str] = ("/usr/sbin",)) -> str:
    """Return the path of program ``name``, or fail the test naming the Debian package."""
    path = shutil.which(name)
    if path is None:
        path = shutil.which(name, path=os.pathsep.join(extra_dirs))
    if path is None:
        pytest.fail(f"{name} not found: apt-get install -y {package}", pytrace=False)
    return path


def log_tail(path: Path, lines: int = 40) -> str:
    """Return the last ``lines`` lines of a server log, framed for a failure message."""
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(no log at {path}: {exc})"
    tail = "\n".join(text.splitlines()[-lines:])
    return f"--- last lines of {path} ---\n{tail}"


def _die_with(parent_death_signal: int) -> Callable[[], None]:
    def preexec() -> None:
        # Linux prctl(PR_SET_PDEATHSIG): a server does not outlive a killed test session. Runs
        # after Popen's setuid, which would clear it.
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, parent_death_signal)

    return preexec


def spawn(
    argv: Sequence[str],
    log_path: Path,
    env: dict[str, str] | None = None,
    user: str | None = None,
    parent_death_signal: int = signal.SIGTERM,
) -> subprocess.Popen:
    """Start a server in the foreground of a child process, its output appended to ``log_path``.

    Parameters
    ----------
    argv
        The server's command line.
    log_path
        Its stdout and stderr; the process runs in this file's folder.
    env
        Added to this process's environment.
    user
        Run as this user (and its group), which needs root.
    parent_death_signal
        Sent to the server by the kernel if this process dies first.
    """
    with log_path.open("ab") as log:
        return subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            cwd=log_path.parent,
            start_new_session=True,
            preexec_fn=_die_with(parent_death_signal),
            **_as_user(user),
        )


def _as_user(user: str | None) -> dict[str, Any]:
    return {} if user is None else {"user": user, "group": user, "extra_groups": []}


def stop_process(
    process: subprocess.Popen, timeout: float = STOP_TIMEOUT, sig: int = signal.SIGTERM
) -> None:
    """Stop a child process with ``sig``, killing it if it does not exit within ``timeout`` s."""
    if process.poll() is not None:
        return
    process.send_signal(sig)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout)


def _running(process: subprocess.Popen, what: str, log_path: Path) -> None:
    if process.poll() is not None:
        pytest.fail(
            f"{what} exited with status {process.returncode} before it was ready\n"
            f"{log_tail(log_path)}",
            pytrace=False,
        )


class _Server:
    """Started by ``with`` or ``start()``, stopped by ``stop()``; a failed start stops itself."""

    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# ---------------------------------------------------------------------------------------------
# Orthanc


# Orthanc talks to 127.0.0.1 only; an http_proxy in the environment must not capture it.
_LOCAL_HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class OrthancServer(_Server):
    """A throw-away Orthanc PACS: DICOM and REST on free ports, storage in ``directory``.

    Orthanc 1.10 listens on all interfaces (it cannot bind to 127.0.0.1 only); remote access to
    its REST API is refused and tests talk to it on 127.0.0.1.
    """

    def __init__(self, directory: Path, aet: str = "ORTHANC", **config: Any) -> None:
        self.directory = Path(directory)
        self.aet = aet
        self.extra_config = config
        self.dicom_port = 0
        self.http_port = 0
        self.log_path = self.directory / "orthanc.log"
        self._process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.http_port}"

    def start(self) -> None:
        binary = require_program("Orthanc", "orthanc")
        self.directory.mkdir(parents=True, exist_ok=True)
        self.dicom_port, self.http_port = free_port(), free_port()
        config_path = self.directory / "orthanc.json"
        config_path.write_text(json.dumps(self._config(), indent=2))
        self._process = spawn([binary, str(config_path)], self.log_path, {"TCP_NODELAY": "1"})
        process = self._process

        def answers() -> bool:
            _running(process, "Orthanc", self.log_path)
            return bool(self.get_json("/system", timeout=1))

        wait_for(
            answers,
            START_TIMEOUT,
            f"Orthanc HTTP on {self.url}/system",
            details=lambda: log_tail(self.log_path),
        )

    def _config(self) -> dict[str, Any]:
        return {
            "Name": "dicomai-test",
            "StorageDirectory": str(self.directory / "storage"),
            "IndexDirectory": str(self.directory / "index"),
            "StorageCompression": False,
            "DicomAet": self.aet,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "Plugins": [],
            "SaveJobs": False,
            **self.extra_config,
        }

    def stop(self, graceful: bool = False) -> None:
        """Stop Orthanc: killed by default, since a graceful stop takes ~3.5 s (its HTTP and
        DICOM servers notice shutdown by polling) and the fixture's storage is thrown away.
        Use ``graceful=True`` before starting again on the same storage."""
        if self._process is None:
            return
        if graceful:
            stop_process(self._process)
        else:
            self._process.kill()
            self._process.wait(STOP_TIMEOUT)
        self._process = None

    def request(
        self, method: str, path: str, body: bytes | None = None, timeout: float = 30
    ) -> bytes:
        """Send one REST request to Orthanc and return the response body."""
        req = urllib.request.Request(self.url + path, data=body, method=method)
        try:
            with _LOCAL_HTTP.open(req, timeout=timeout) as response:
                return response.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode(errors="replace")
            raise AssertionError(f"Orthanc {method} {path} answered {exc.code}: {detail}") from exc

    def get_json(self, path: str, timeout: float = 30) -> Any:
        return json.loads(self.request("GET", path, timeout=timeout))

    def post_json(self, path: str, body: bytes | str) -> Any:
        data = body.encode() if isinstance(body, str) else body
        return json.loads(self.request("POST", path, data))

    def instances(self) -> list[str]:
        """Return the Orthanc IDs of all stored instances."""
        return list(self.get_json("/instances"))

    def instance_tags(self, orthanc_id: str) -> dict[str, Any]:
        """Return an instance's tags keyed by DICOM keyword (Orthanc's simplified-tags)."""
        return dict(self.get_json(f"/instances/{orthanc_id}/simplified-tags"))

    def instance_file(self, orthanc_id: str) -> bytes:
        """Return the stored DICOM file of an instance, byte for byte."""
        return self.request("GET", f"/instances/{orthanc_id}/file")

    def count_instances(self) -> int:
        """Return the number of stored instances, from ``/statistics``."""
        return int(self.get_json("/statistics")["CountInstances"])

    def find_sop_instance(self, sop_uid: str) -> str | None:
        """Return the Orthanc ID of the instance with SOPInstanceUID ``sop_uid``, if stored."""
        for match in self.post_json("/tools/lookup", sop_uid):
            if match["Type"] == "Instance":
                return str(match["ID"])
        return None

    def upload_instance(self, data: bytes) -> str:
        """Store a DICOM file through REST (no DIMSE) and return its Orthanc ID."""
        return str(self.post_json("/instances", data)["ID"])

    def delete_all(self) -> None:
        """Delete every stored patient, and with them every study, series and instance."""
        for patient in self.get_json("/patients"):
            self.request("DELETE", f"/patients/{patient}")


# ---------------------------------------------------------------------------------------------
# redis-server


class RedisServer(_Server):
    """A redis-server on a free loopback port, append-only file in ``directory``, no RDB saves."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.port = 0
        self.log_path = self.directory / "redis.log"
        self._process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    def client(self) -> redis.Redis:
        """Return a new client connected to database 0."""
        return redis.Redis(host=LOOPBACK, port=self.port, socket_timeout=5)

    def start(self) -> None:
        """Start the server; after a ``stop()`` it comes back on the same port and folder."""
        binary = require_program("redis-server", "redis-server")
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        argv = [binary, "--port", str(self.port), "--bind", LOOPBACK, "--save", ""]
        argv += ["--appendonly", "yes", "--dir", str(self.directory), "--daemonize", "no"]
        self._process = spawn(argv, self.log_path)
        process = self._process

        def pong() -> bool:
            _running(process, "redis-server", self.log_path)
            with redis.Redis(host=LOOPBACK, port=self.port, socket_timeout=1) as probe:
                return bool(probe.ping())

        wait_for(
            pong,
            START_TIMEOUT,
            f"redis-server PING on {self.url}",
            ignore=(OSError, redis.exceptions.ConnectionError, redis.exceptions.BusyLoadingError),
            details=lambda: log_tail(self.log_path),
        )

    def stop(self) -> None:
        """Shut down gracefully (SIGTERM: the append-only file is flushed)."""
        if self._process is not None:
            stop_process(self._process)
            self._process = None

    def kill(self) -> None:
        """Kill the server without warning (SIGKILL), as a crash would."""
        if self._process is not None:
            self._process.kill()
            self._process.wait(STOP_TIMEOUT)
            self._process = None

    def restart(self) -> None:
        """Stop and start again on the same port and folder."""
        self.stop()
        self.start()


# ---------------------------------------------------------------------------------------------
# PostgreSQL


def postgres_program(name: str) -> str:
    """Return Debian's versioned path of a PostgreSQL server program (kept off PATH)."""
    candidates = glob.glob(f"/usr/lib/postgresql/*/bin/{name}")
    if candidates:

        def version(path: str) -> tuple[int, ...]:
            return tuple(int(part) for part in re.findall(r"\d+", Path(path).parent.parent.name))

        return max(candidates, key=version)
    return require_program(name, "postgresql", extra_dirs=())


class PostgresServer(_Server):
    """A PostgreSQL cluster on a free loopback port with trust authentication.

    The server refuses to run as root, so as root its programs run as the ``postgres`` user on a
    folder it owns, made with ``tempfile.mkdtemp`` (pytest's own temporary folders are private
    to root) and removed on stop. The postmaster runs in the foreground as this process's child,
    so it dies with a killed test session instead of outliving it as ``pg_ctl start`` would.
    """

    def __init__(self) -> None:
        self.port = 0
        self.base: Path | None = None
        self._process: subprocess.Popen | None = None

    @property
    def data_dir(self) -> Path:
        assert self.base is not None, "PostgresServer not started"
        return self.base / "data"

    @property
    def log_path(self) -> Path:
        assert self.base is not None, "PostgresServer not started"
        return self.base / "postgres.log"

    def url(self, dbname: str = "postgres") -> str:
        """Return the libpq URL of database ``dbname``."""
        return f"postgresql://postgres@{LOOPBACK}:{self.port}/{dbname}"

    @property
    def _owner(self) -> str | None:
        return "postgres" if os.geteuid() == 0 else None

    def start(self) -> None:
        initdb, postgres = postgres_program("initdb"), postgres_program("postgres")
        self.base = Path(tempfile.mkdtemp(prefix="dicomai-pg-"))
        self.base.chmod(0o755)
        if self._owner is not None:
            shutil.chown(self.base, self._owner, self._owner)
        self.port = free_port()
        self._initdb(initdb)
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write(self._settings())
        # PostgreSQL docs, "Shutting down the server": SIGINT is the fast shutdown.
        self._process = spawn(
            [postgres, "-D", str(self.data_dir)],
            self.log_path,
            user=self._owner,
            parent_death_signal=signal.SIGINT,
        )
        process = self._process

        def accepts_connections() -> bool:
            _running(process, "PostgreSQL", self.log_path)
            with psycopg.connect(self.url(), connect_timeout=2) as conn:
                return conn.execute("SELECT 1").fetchone() == (1,)

        wait_for(
            accepts_connections,
            START_TIMEOUT,
            f"PostgreSQL on {self.url()}",
            ignore=(OSError, psycopg.OperationalError),
            details=lambda: log_tail(self.log_path),
        )

    def _initdb(self, initdb: str) -> None:
        argv = [initdb, "-D", str(self.data_dir), "--auth=trust", "--username=postgres"]
        argv += ["--encoding=UTF8", "--locale=C", "--no-sync"]
        result = subprocess.run(
            argv,
            cwd=self.base,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            **_as_user(self._owner),
        )
        if result.returncode != 0:
            pytest.fail(
                f"initdb failed with status {result.returncode}:\n{result.stdout}{result.stderr}",
                pytrace=False,
            )

    def _settings(self) -> str:
        # Durability against power loss is not what tests check; fsync off makes CREATE DATABASE
        # and commits fast. A killed server still keeps what reached the kernel.
        return (
            f"\nlisten_addresses = '{LOOPBACK}'\nport = {self.port}\n"
            f"unix_socket_directories = '{self.base}'\n"
            "fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n"
        )

    def stop(self) -> None:
        """Stop the server (fast shutdown: sessions are ended) and remove its folder."""
        try:
            if self._process is not None:
                stop_process(self._process, sig=signal.SIGINT)
        finally:
            self._process = None
            if self.base is not None:
                shutil.rmtree(self.base, ignore_errors=True)
                self.base = None

    def connect(self, dbname: str = "postgres", **kwargs: Any) -> psycopg.Connection:
        """Open a psycopg connection to ``dbname``."""
        return psycopg.connect(self.url(dbname), **kwargs)

    def create_database(self, name: str) -> str:
        """Create database ``name`` and return its URL."""
        with self.connect(autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url(name)

    def drop_database(self, name: str) -> None:
        """Drop database ``name``, closing any connection still open to it."""
        with self.connect(autocommit=True) as conn:
            statement = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
            conn.execute(statement.format(sql.Identifier(name)))


# ---------------------------------------------------------------------------------------------
# dcmtk, dicom3tools, sample files

_DCMTK_ENV = {"TCP_NODELAY": "1"}  # FACTS: without it every DIMSE message waits ~40 ms


def _run_tool(argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **_DCMTK_ENV},
        check=False,
    )


def storescu(
    port: int,
    files: Iterable[str | os.PathLike[str]],
    aet: str = "MODALITY",
    aec: str = "DICOMAI",
    extra_args: Sequence[str] = (),
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """Send ``files`` with dcmtk's storescu to 127.0.0.1:``port``; the caller checks the result.

    By default storescu proposes uncompressed transfer syntaxes only and fails on a compressed
    file ("unable to convert dataset"); pass the ``-x…`` option for the files' syntax in
    ``extra_args``: ``-xv`` JPEG 2000 lossless, ``-xw`` JPEG 2000 (.91), ``-xs`` JPEG lossless,
    ``-xy``/``-xx`` JPEG lossy 8/12 bit, ``-xr`` RLE; uncompressed files still go through in the
    same run. ``["+sd", "+r"]`` sends folders, ``["-v"]`` shows the association. ``extra_args``
    go before the address.
    """
    binary = require_program("storescu", "dcmtk")
    argv = [binary, "-aet", aet, "-aec", aec, *extra_args, LOOPBACK, str(port)]
    return _run_tool(argv + [os.fspath(f) for f in files], timeout)


def echoscu(
    port: int, aet: str = "MODALITY", aec: str = "DICOMAI", timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Send one C-ECHO with dcmtk's echoscu to 127.0.0.1:``port``."""
    binary = require_program("echoscu", "dcmtk")
    return _run_tool([binary, "-aet", aet, "-aec", aec, LOOPBACK, str(port)], timeout)


_PROBLEM = re.compile(r"(^|\s)(Error|Abort) - ")


class Verification(NamedTuple):
    """What dciodvfy said about one file: ``ok`` is no ``Error``/``Abort`` line and status 0."""

    ok: bool
    output: str

    @property
    def errors(self) -> list[str]:
        return [line for line in self.output.splitlines() if _PROBLEM.search(line)]

    @property
    def warnings(self) -> list[str]:
        return [line for line in self.output.splitlines() if "Warning - " in line]


def dciodvfy(path: str | os.PathLike[str], timeout: float = 60) -> Verification:
    """Check a DICOM file against its IOD with dicom3tools' dciodvfy.

    dciodvfy writes everything to stderr: the IOD's name, then ``Warning - …`` and
    ``Error - …`` lines (``(gggg,eeee) ? - Error - …`` for element-level faults, ``Abort - …``
    when the file cannot be read). It exits 0 with warnings only, 1 with errors.
    """
    binary = require_program("dciodvfy", "dicom3tools")
    result = _run_tool([binary, os.fspath(path)], timeout)
    output = result.stdout + result.stderr
    problems = [line for line in output.splitlines() if _PROBLEM.search(line)]
    return Verification(ok=result.returncode == 0 and not problems, output=output)


def sample_file(name: str) -> Path:
    """Return the path of a sample file shipped in pydicom's wheel, never downloading."""
    path = get_testdata_file(name, download=False)
    if not isinstance(path, str):
        pytest.fail(
            f"pydicom sample file {name!r} does not ship in the pydicom wheel; "
            f"use one of {sorted(SAMPLE_FILES)}",
            pytrace=False,
        )
    return Path(path)


def sample_copies(name: str, folder: Path, count: int, uid_root: str) -> list[Path]:
    """`count` copies of a pydicom sample file in `folder`, each its own instance
    (SOP Instance UID ``<uid_root>.<n>``), for tests that send several stores."""
    written = []
    for number in range(count):
        ds = pydicom.dcmread(sample_file(name))
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"{uid_root}.{number}"
        written.append(folder / f"{number}.dcm")
        ds.save_as(written[-1])
    return written


def sample_files(names: Iterable[str]) -> list[Path]:
    """Return the paths of several pydicom sample files (see ``SAMPLE_FILES``)."""
    return [sample_file(name) for name in names]
