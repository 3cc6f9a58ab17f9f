"""Folder destination: an output object copied atomically into a directory."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from dicomai.errors import DeliveryError


def copy_file(path: Path, folder: Path) -> Path:
    """Copy `path` into `folder` under the same name, visible only once complete."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        final = folder / path.name
        tmp = folder / f".{path.name}.tmp"
        shutil.copyfile(path, tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, final)
    except OSError as exc:
        raise DeliveryError(f"cannot write to {folder}: {exc.strerror or exc}") from None
    return final
