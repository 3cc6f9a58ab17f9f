"""The `serve` daemon: the DICOM listener, the assembly/reconcile loop and the embedded worker."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pynetdicom import AE
from sqlalchemy.orm import Session, sessionmaker

from dicomai import metrics_server
from dicomai.config import Settings
from dicomai.db.migrate import require_current
from dicomai.db.session import make_engine, make_sessionmaker
from dicomai.errors import ConfigError
from dicomai.health import NO_MODEL, reporting_versions
from dicomai.ingest.recovery import forget_lost_instances
from dicomai.ingest.scp import build_ae, handlers, on_refused_connection
from dicomai.ingest.server import LISTEN_FD_ENV, SharedPortServer, serve_in_thread
from dicomai.ingest.spool import Spool
from dicomai.ingest.tls import server_context
from dicomai.ingest.transfers import forget_dead_listeners
from dicomai.jobs.assembler import CompletionPolicy, complete_studies, seconds_until_quiet
from dicomai.jobs.doorbell import Doorbell
from dicomai.jobs.reconciler import Leases, ring_deliveries, ring_jobs
from dicomai.metrics import SPOOL_FREE_BYTES
from dicomai.restarts import RestartBackoff

log = logging.getLogger(__name__)

# How long a stopping listener lets open associations finish: under the systemd unit's
# TimeoutStopSec (60 s), with room for the children, which drain at the same time.
DRAIN_SECONDS = 30

# A worker's output file being written: `.<final name>.<pid>.<thread>.tmp` beside the final
# file (`dicomai.jobs.runner._write_outputs`). Final names are `<UID>.dcm`.
_PARTIAL_OUTPUT = re.compile(r"\..+\.\d+\.\d+\.tmp")
# Workers on other machines write outputs while `serve` starts: a partial file is a killed
# worker's only once nothing has written it for this long (100 overlays take about a second).
PARTIAL_OUTPUT_AGE_SECONDS = 600


class Daemon:
    """Everything `dicomai serve` runs, started and stopped together.

    The main process listens, completes studies and rings workers; it also keeps its children
    running: the embedded worker and, with `listener_processes > 1`, more listener processes
    accepting from its listening socket (`listener_only`), which run nothing but the listener.
    """

    def __init__(
        self, settings: Settings, config_file: Path | None = None, listener_only: bool = False
    ) -> None:
        self.settings = settings
        self.config_file = config_file
        self.listener_only = listener_only
        engine = make_engine(settings.database_url, create=False)
        require_current(engine, settings.database_url)
        self.sessions: sessionmaker[Session] = make_sessionmaker(engine)
        ingest = settings.ingest
        self.completion = CompletionPolicy(
            quiet_seconds=ingest.study_quiet_seconds,
            on_association_end=ingest.complete_on_association_end,
            max_wait_seconds=ingest.study_max_wait_seconds,
        )
        self.spool = Spool(settings.spool_dir, settings.storage.min_free_mb * 1024 * 1024)
        self.ssl_context = server_context(ingest.tls)
        self.stopping = threading.Event()
        self.server: SharedPortServer | None = None
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self.restarts = RestartBackoff()
        self._restart_at: dict[str, float] = {}

    def run(self) -> None:
        """Serve until SIGTERM or SIGINT."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: self.stopping.set())
        if self.settings.ingest.allow_any and not self.listener_only:
            log.warning("ingest.allow_any is true: ANY sender may store studies (labs only)")
        self.start()
        try:
            if self.listener_only:
                self.stopping.wait()
            else:
                self.loop()
        finally:
            self.stop()

    def _warn_without_model(self) -> None:
        # The install steps once ended with a service that stored every study and analysed
        # none, with nothing in its log.
        with self.sessions() as session:
            if not reporting_versions(session):
                log.warning("%s", NO_MODEL)

    def start(self) -> None:
        if not self.listener_only:
            self._lock_storage()
            # Before any listener runs (children included): no write can be in progress.
            removed = self.spool.remove_partial_files()
            if removed:
                log.warning("removed %d partial spool files of interrupted stores", removed)
            removed = remove_partial_outputs(self.settings.outputs_dir, PARTIAL_OUTPUT_AGE_SECONDS)
            if removed:
                log.warning("removed %d partial output files of interrupted workers", removed)
            forgotten = forget_lost_instances(self.sessions, self.spool)
            if forgotten:
                log.warning("removed %d rows of instances whose files a crash lost", forgotten)
            # Before the listener answers: whoever sees the daemon up can scrape it.
            metrics = self.settings.metrics
            if metrics.port:
                with _listening("[metrics]", metrics.host, metrics.port):
                    metrics_server.start(
                        metrics, self.sessions, worker_counters=self.settings.worker.embedded
                    )
                log.info("metrics on http://%s:%d/metrics", metrics.host, metrics.port)
        # In every listener process: one restarted after a crash removes its predecessor's.
        try:
            left = forget_dead_listeners(self.sessions, self.settings.ingest.study_max_wait_seconds)
        except Exception as exc:  # left rows only keep their studies to the quiet period
            log.error("could not remove dead listeners' transfers: %s", type(exc).__name__)
            left = 0
        if left:
            log.warning("removed %d transfers of listener processes that died", left)
        ingest = self.settings.ingest
        # Bound before the listener children start: they accept from this socket.
        with _listening("[ingest]", ingest.host, ingest.port):
            self.server = serve_in_thread(
                build_ae(self.settings),
                (ingest.host, ingest.port),
                self.ssl_context,
                handlers(self.settings, self.spool, self.sessions),
                on_refused_connection(self.sessions),
            )
        if not self.listener_only:
            self._start_services()
            # Once bound: a start that fails says only what stopped it.
            self._warn_without_model()
        log.info(
            "listening as %s on %s:%d%s",
            ingest.ae_title,
            ingest.host,
            ingest.port,
            " (TLS)" if self.ssl_context else "",
        )

    def _start_services(self) -> None:
        from workers.app import make_app
        from workers.doorbell import CeleryDoorbell

        self.doorbell: Doorbell = CeleryDoorbell(make_app(self.settings))
        wanted = [f"listener-{n}" for n in range(1, self.settings.ingest.listener_processes)]
        if self.settings.worker.embedded:
            wanted.append("worker")
        for name in wanted:
            self.children[name] = self._spawn(name)

    def loop(self, period: float = 0.2) -> None:
        leases = Leases.from_settings(self.settings.worker)
        wait = period
        while not self.stopping.wait(wait):
            wait = period
            try:
                SPOOL_FREE_BYTES.set(self.spool.free_bytes())
                complete_studies(self.sessions, self.completion)
                ring_jobs(self.sessions, self.doorbell, leases)
                ring_deliveries(self.sessions, self.doorbell, leases)
                # Woken when the next study falls quiet, not up to a period after it; never
                # more often than every 50 ms, should a quiet study stay open.
                quiet = seconds_until_quiet(self.sessions, self.completion)
                if quiet is not None:
                    wait = min(period, max(0.05, quiet + 0.005))
            except Exception as exc:  # the loop must outlive a database or broker outage
                log.error("assembly loop: %s: %s", type(exc).__name__, exc)
            self._restart_exited_children()

    def _restart_exited_children(self) -> None:
        now = time.monotonic()
        for name, child in list(self.children.items()):
            if child.poll() is None:
                continue
            if name not in self._restart_at:
                metrics_server.process_exited(child.pid)
                wait = self.restarts.exited(name, now)
                self._restart_at[name] = now + wait
                log.error(
                    "%s exited with %s; restarting%s",
                    name,
                    child.returncode,
                    f" in {wait:g} s (it keeps exiting soon after it starts)" if wait else "",
                )
            if now >= self._restart_at[name]:
                del self._restart_at[name]
                self.children[name] = self._spawn(name)

    def _lock_storage(self) -> None:
        """One `serve` per storage folder: a second would remove the first's partial files
        at its start, and assemble and reconcile beside it."""
        path = self.settings.storage.dir / "serve.lock"
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._storage_lock = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._storage_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(
                f"another `dicomai serve` is running on {self.settings.storage.dir}: stop it "
                "first (systemctl stop dicomai-serve)"
            ) from None

    def stop(self) -> None:
        """Stop accepting, let the associations in flight finish (for `DRAIN_SECONDS` at
        most, then abort them), and stop the children, which do the same meanwhile."""
        for child in self.children.values():
            if child.poll() is None:
                child.terminate()
        try:
            if self.server is not None:
                self.server.shutdown()
                self._drain(self.server.ae)
        finally:
            self._stop_children()
        log.info("stopped")

    @staticmethod
    def _drain(ae: AE) -> None:
        # A store cut off by the exit was answered nothing, and its file could stay in the
        # spool without a row; a sender whose association is aborted knows to send again.
        # Only established associations are waited for: one still negotiating, or aborted
        # and waiting for its peer to close, has nothing in flight.
        def busy() -> list[Any]:
            return [assoc for assoc in ae.active_associations if assoc.is_established]

        deadline = time.monotonic() + DRAIN_SECONDS
        if busy():
            log.info("waiting for %d association(s) to finish", len(busy()))
        while busy() and time.monotonic() < deadline:
            time.sleep(0.05)
        for assoc in busy():
            log.warning("aborting an association still open after %d s", DRAIN_SECONDS)
            assoc.abort()

    def _stop_children(self) -> None:
        for child in self.children.values():
            if child.poll() is None:
                child.terminate()
        for child in self.children.values():
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()

    def _spawn(self, name: str) -> subprocess.Popen[bytes]:
        self.restarts.started(name, time.monotonic())
        env = dict(os.environ)
        if self.config_file is not None:
            env["DICOMAI_CONFIG"] = str(self.config_file)
        command = ["worker"] if name == "worker" else ["serve", "--listener-only"]
        inherited: tuple[int, ...] = ()
        if name != "worker" and self.server is not None:
            inherited = (self.server.share(),)
            env[LISTEN_FD_ENV] = str(inherited[0])
        return subprocess.Popen(
            [sys.executable, "-m", "dicomai", *command],
            env=env,
            pass_fds=inherited,
            preexec_fn=_die_with_parent,
        )


def remove_partial_outputs(outputs: Path, age_seconds: float) -> int:
    """Remove the partial files a worker killed while writing a study's outputs left behind
    (named as `dicomai.jobs.runner` names them, unchanged for `age_seconds`); return how many.

    Such a file never got its final name nor a row, so nothing delivers it. Younger ones
    may be a live worker's, and stay until a later start.
    """
    removed = 0
    oldest = time.time() - age_seconds
    for path in outputs.glob("*/.*.tmp"):
        with contextlib.suppress(FileNotFoundError):
            if _PARTIAL_OUTPUT.fullmatch(path.name) and path.lstat().st_mtime < oldest:
                path.unlink()
                removed += 1
    return removed


def _die_with_parent() -> None:
    # Linux prctl(PR_SET_PDEATHSIG, SIGTERM): a child outlives no SIGKILLed serve process.
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


@contextlib.contextmanager
def _listening(section: str, host: str, port: int) -> Iterator[None]:
    """Name the address and the setting of `section` ("[ingest]", "[metrics]") a bind failed
    on: "Address already in use" alone did not say whether the DICOM or the metrics port was
    taken, and "Name or service not known" named no setting at all."""
    try:
        yield
    except socket.gaierror as exc:
        # A host name that passed the settings' check but does not resolve (yet) on this
        # machine: the resolver's own errno is no bind error's.
        raise ConfigError(
            f"cannot listen on {host}:{port} ({section} host): {exc.strerror or exc}"
        ) from None
    except OSError as exc:
        if exc.filename is not None or exc.errno not in _BIND_ERRORS:
            raise
        key = "host" if exc.errno == errno.EADDRNOTAVAIL else "port"
        raise ConfigError(
            f"cannot listen on {host}:{port} ({section} {key}): {exc.strerror}"
        ) from None


_BIND_ERRORS = {errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES}
