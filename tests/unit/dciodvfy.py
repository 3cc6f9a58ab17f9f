"""Run dicom3tools' dciodvfy on a file and say whether it found errors."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest


def dciodvfy(path: Path | str) -> tuple[bool, str]:
    """Validate `path` against its IOD with dciodvfy.

    dciodvfy writes its findings to stderr, one per line, as "Error - ...", "Warning - ..."
    or "Abort - ..." (an unreadable file); its exit status is 0 even when it finds errors.

    Returns
    -------
    tuple of (bool, str)
        Whether no line reports an error or an abort, and the whole output.
    """
    binary = shutil.which("dciodvfy")
    if binary is None:
        pytest.fail("dciodvfy not found: apt-get install -y dicom3tools")
    result = subprocess.run(
        [binary, str(path)], capture_output=True, text=True, errors="replace", check=False
    )
    output = result.stdout + result.stderr
    ok = result.returncode == 0 and not any(
        line.startswith(("Error", "Abort")) or " Error " in line for line in output.splitlines()
    )
    return ok, output
