"""Durable storage of received instances: a temporary file renamed to its final name, the file
and its directory fsynced (after the rename, or before it for a replacement)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from dicomai.errors import InvalidInstance, StorageUnavailable
from dicomai.uids import is_valid_uid

# A write in progress: `.<final name>.<pid>.<thread>.tmp` beside the final file. Final names
# are `<UID>.dcm` and never start with a dot, so the pattern cannot match an instance.
# The folder of resent contents kept aside (`dicomai.ingest.store`); no UID is a word, so no
# study is named so.
RESENDS = "resends"
# An instance's at <study>/, a resend's kept aside at resends/<study>/.
_PARTIAL_GLOBS = ("*/.*.tmp", f"{RESENDS}/*/.*.tmp")

# The fsyncs of placed files and their folders, several at once: the file system journals
# them (and a database commit running meanwhile) together.
_SYNCS = ThreadPoolExecutor(max_workers=8, thread_name_prefix="fsync")


class Placed:
    """A new instance's file under its final name, complete but not yet durable.

    `start_sync` fsyncs the file and its folder on other threads, so that the caller can
    commit the instance's row meanwhile; `wait_durable` returns once both are on disk.
    """

    def __init__(self, path: Path, fd: int, size: int) -> None:
        self.path = path
        self.size = size
        self._fd: int | None = fd
        self._syncs: list[Future[None]] = []

    def start_sync(self) -> None:
        assert self._fd is not None, "already synced or discarded"
        self._syncs = [
            _SYNCS.submit(os.fsync, self._fd),
            _SYNCS.submit(_fsync_dir, self.path.parent),
        ]

    def wait_durable(self) -> None:
        """Wait for the fsyncs `start_sync` began (or run them now).

        Raises
        ------
        StorageUnavailable
            An fsync failed: the bytes or the name may not be on disk. The file stays, and
            stays locked, for the caller to `discard` once its row is gone: a concurrent
            store of the instance must not take the row for a durable one meanwhile.
        """
        if not self._syncs:
            self.start_sync()
        errors = [future.exception() for future in self._syncs]
        error = next((e for e in errors if e is not None), None)
        if error is not None:
            message = getattr(error, "strerror", None) or error
            raise StorageUnavailable(f"spool fsync failed: {message}")
        self.close()

    def discard(self) -> None:
        """Remove the file (after any fsync in progress): no row will name it."""
        for future in self._syncs:
            future.exception()
        # Removed while our lock still says the name is in flight (see `Spool.in_flight`).
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self.close()

    def close(self) -> None:
        """Release the file (and the lock that says its store is in flight)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class Spool:
    """The folder that holds every received instance, one file per SOP Instance UID."""

    def __init__(self, root: Path, min_free_bytes: int = 0) -> None:
        self.root = root
        self.min_free_bytes = min_free_bytes
        # Patient data: readable by the service user only (files 0600, folders 0700).
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.root.chmod(0o700)

    def relative_path(self, study_uid: str, sop_instance_uid: str) -> str:
        """The file name of an instance; only validated UIDs ever become path parts.

        Raises
        ------
        InvalidInstance
            Either UID is not a UID by PS3.5 §9.1 (so `..` or `/` never reach the disk).
        """
        for name, uid in (("StudyInstanceUID", study_uid), ("SOPInstanceUID", sop_instance_uid)):
            if not is_valid_uid(uid):
                raise InvalidInstance(f"{name} is not a valid UID")
        return f"{study_uid}/{sop_instance_uid}.dcm"

    def path(self, relative: str) -> Path:
        return self.root / relative

    def place(self, relative: str, chunks: Iterable[bytes | memoryview]) -> Placed:
        """Write `chunks` and give them the name `relative`, not yet durably (see `Placed`).

        Nothing is visible under the final name until every byte is written; until
        `Placed.wait_durable` returns, a power loss may take the file or its name.

        Raises
        ------
        NameTaken
            A file has the name already: another store of the same instance is in flight
            (or a crash cut one short after its file was named); nothing is written.
        StorageUnavailable
            The spool is below its watermark, or the disk is full or not writable; no
            partial file is left behind.
        """
        final, tmp = self._prepare(relative)
        fd = -1
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            # Held until the file is durable or discarded: its row is committed by then.
            fcntl.flock(fd, fcntl.LOCK_SH)
            size = _write_all(fd, chunks)
            _take_name(tmp, final)
        except NameTaken:
            os.close(fd)
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        except OSError as exc:
            if fd >= 0:
                os.close(fd)
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise StorageUnavailable(f"spool write failed: {exc.strerror or exc}") from None
        return Placed(final, fd, size)

    def write(self, relative: str, chunks: Iterable[bytes | memoryview]) -> int:
        """Write `chunks` under `relative` durably; return the number of bytes written.

        The bytes are on disk before they take the final name, so a file that replaces
        another is never seen half-written, even after a power loss.

        Raises
        ------
        StorageUnavailable
            The disk is full or not writable; no partial file is left behind.
        """
        final, tmp = self._prepare(relative)
        try:
            size = _write_fsynced(tmp, chunks)
            os.replace(tmp, final)
            _fsync_dir(final.parent)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise StorageUnavailable(f"spool write failed: {exc.strerror or exc}") from None
        return size

    def _prepare(self, relative: str) -> tuple[Path, Path]:
        """The final and temporary paths of a write, its study folder made durable."""
        if self.min_free_bytes and self.free_bytes() < self.min_free_bytes:
            raise StorageUnavailable("spool below its free-space watermark")
        final = self.root / relative
        tmp = final.with_name(f".{final.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            created = not final.parent.exists()
            final.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            if created:
                _fsync_dir(final.parent.parent)
        except OSError as exc:
            raise StorageUnavailable(f"spool write failed: {exc.strerror or exc}") from None
        return final, tmp

    def remove_partial_files(self) -> int:
        """Remove the temporary files of writes a crash cut short; return how many.

        Such a file never got its final name nor a row, and the sender never got Success,
        so it is no instance. Call it only while nothing writes to the spool (at start).
        """
        removed = 0
        for pattern in _PARTIAL_GLOBS:
            for path in self.root.glob(pattern):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    removed += 1
        return removed

    def in_flight(self, relative: str) -> bool:
        """Whether a store that `place`d this file is still writing, recording or syncing it
        (in any process). A file none holds, and no row names, a crash left behind."""
        try:
            fd = os.open(self.root / relative, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def remove_orphan(self, relative: str, has_row: Callable[[], bool]) -> None:
        """Remove the file at `relative` if no store holds it (see `in_flight`) and no row
        names it, both decided under its lock: the file checked, not one a concurrent
        store put there since, nor one a store made durable and recorded meanwhile."""
        path = self.root / relative
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if os.fstat(fd).st_ino == os.stat(path).st_ino and not has_row():
                path.unlink()
        except (BlockingIOError, FileNotFoundError):
            pass  # a store holds it now, or another removed it: the caller looks again
        finally:
            os.close(fd)

    def remove(self, relative: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.root / relative).unlink()

    def free_bytes(self) -> int:
        stat = os.statvfs(self.root)
        return stat.f_bavail * stat.f_frsize


class NameTaken(Exception):
    """The spool already has a file of that name."""


def _take_name(tmp: Path, final: Path) -> None:
    """Give `tmp` the name `final` unless a file has it: of two concurrent stores of one
    instance, the second must not replace a file whose row the first is committing."""
    try:
        os.link(tmp, final)
    except FileExistsError:
        raise NameTaken(str(final)) from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
        os.replace(tmp, final)  # a file system without hard links: last writer wins
        return
    os.unlink(tmp)


def _write_fsynced(path: Path, chunks: Iterable[bytes | memoryview]) -> int:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        size = _write_all(fd, chunks)
        os.fsync(fd)
    finally:
        os.close(fd)
    return size


def _write_all(fd: int, chunks: Iterable[bytes | memoryview]) -> int:
    size = 0
    for chunk in chunks:
        view = memoryview(chunk)
        while view:
            written = os.write(fd, view)
            view = view[written:]
            size += written
    return size


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
