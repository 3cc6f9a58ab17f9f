"""A folder destination's copies are readable by the service's group, never by everyone."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import BinaryIO

import pytest

from dicomai.delivery.folder import copy_file
from dicomai.errors import DeliveryError


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_copies_are_0640_in_a_0750_folder_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    source = tmp_path / "sr.dcm"
    source.write_bytes(b"DICM result")
    previous = os.umask(umask)
    try:
        copied = copy_file(source, tmp_path / "results" / "site" / "study")
    finally:
        os.umask(previous)
    assert copied.read_bytes() == b"DICM result"
    assert stat.S_IMODE(copied.stat().st_mode) == 0o640
    for level in ("results", "results/site", "results/site/study"):  # every level it made
        assert stat.S_IMODE((tmp_path / level).stat().st_mode) == 0o750, level


def test_a_folder_the_site_made_keeps_its_mode(tmp_path: Path) -> None:
    folder = tmp_path / "shared"
    folder.mkdir(mode=0o770)
    os.chmod(folder, 0o770)
    source = tmp_path / "sc.dcm"
    source.write_bytes(b"x")
    copy_file(source, folder)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o770


def test_a_copy_that_fills_the_disk_leaves_no_partial_file(tmp_path: Path, monkeypatch) -> None:
    source = tmp_path / "sr.dcm"
    source.write_bytes(b"DICM result" * 1000)
    folder = tmp_path / "results"

    def full(_source: object, target: BinaryIO) -> None:
        target.write(b"DICM res")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("dicomai.delivery.folder.shutil.copyfileobj", full)
    with pytest.raises(DeliveryError, match="No space left on device"):
        copy_file(source, folder)
    assert list(folder.iterdir()) == [], "a partial copy kept the disk full"
