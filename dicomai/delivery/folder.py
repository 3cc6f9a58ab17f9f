"""Folder destination: an output object copied atomically into a directory."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from dicomai.errors import DeliveryError

# Results carry the patient's name and ID: readable by the service's group (a reader
# service added to it), never by every user of the machine, whatever the umask.
FILE_MODE = 0o640
FOLDER_MODE = 0o750


def copy_file(path: Path, folder: Path) -> Path:
    """Copy `path` into `folder` under the same name, visible only once complete."""
    try:
        missing = [p for p in (folder, *folder.parents) if not p.exists()]
        for level in reversed(missing):
            level.mkdir(mode=FOLDER_MODE, exist_ok=True)
            # mkdir's mode passes through the umask (0077 in our systemd units): set it, on
            # every level made here, or the group could not reach the results.
            os.chmod(level, FOLDER_MODE)
        final = folder / path.name
        tmp = folder / f".{path.name}.tmp"
        descriptor = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    except OSError as exc:
        raise DeliveryError(f"cannot write to {folder}: {exc.strerror or exc}") from None
    try:
        with open(descriptor, "wb") as target, open(path, "rb") as source:
            os.fchmod(target.fileno(), FILE_MODE)  # an older .tmp keeps its mode otherwise
            shutil.copyfileobj(source, target)
            target.flush()
            os.fsync(target.fileno())
        os.replace(tmp, final)
    except OSError as exc:
        # A partial copy on a full disk kept it full until an attempt succeeded (or for good).
        tmp.unlink(missing_ok=True)
        raise DeliveryError(f"cannot write to {folder}: {exc.strerror or exc}") from None
    return final
