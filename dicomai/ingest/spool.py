"""Durable storage of received instances: tmp file, fsync, rename, fsync the directory."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterable
from pathlib import Path

from dicomai.errors import InvalidInstance, StorageUnavailable
from dicomai.uids import is_valid_uid

# A write in progress: `.<final name>.<pid>.<thread>.tmp` beside the final file. Final names
# are `<UID>.dcm` and never start with a dot, so the pattern cannot match an instance.
_PARTIAL_GLOB = "*/.*.tmp"


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

    def write(self, relative: str, chunks: Iterable[bytes | memoryview]) -> int:
        """Write `chunks` under `relative` durably; return the number of bytes written.

        Nothing is visible under the final name until every byte is on disk (DESIGN.md rule 1).

        Raises
        ------
        StorageUnavailable
            The disk is full or not writable; no partial file is left behind.
        """
        if self.min_free_bytes and self.free_bytes() < self.min_free_bytes:
            raise StorageUnavailable("spool below its free-space watermark")
        final = self.root / relative
        tmp = final.with_name(f".{final.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            created = not final.parent.exists()
            final.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            if created:
                _fsync_dir(final.parent.parent)
            size = _write_fsynced(tmp, chunks)
            os.replace(tmp, final)
            _fsync_dir(final.parent)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise StorageUnavailable(f"spool write failed: {exc.strerror or exc}") from None
        return size

    def remove_partial_files(self) -> int:
        """Remove the temporary files of writes a crash cut short; return how many.

        Such a file never got its final name nor a row, and the sender never got Success,
        so it is no instance. Call it only while nothing writes to the spool (at start).
        """
        removed = 0
        for path in self.root.glob(_PARTIAL_GLOB):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed += 1
        return removed

    def remove(self, relative: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.root / relative).unlink()

    def free_bytes(self) -> int:
        stat = os.statvfs(self.root)
        return stat.f_bavail * stat.f_frsize


def _write_fsynced(path: Path, chunks: Iterable[bytes | memoryview]) -> int:
    size = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for chunk in chunks:
            view = memoryview(chunk)
            while view:
                written = os.write(fd, view)
                view = view[written:]
                size += written
        os.fsync(fd)
    finally:
        os.close(fd)
    return size


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
