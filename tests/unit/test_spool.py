"""The spool writes durably under validated names and never leaves a partial file."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicomai.errors import InvalidInstance, StorageUnavailable
from dicomai.ingest.spool import Spool


def test_write_puts_all_chunks_under_the_final_name(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    relative = spool.relative_path("1.2.3", "1.2.3.4")
    size = spool.write(relative, [b"abc", memoryview(b"defg")])
    assert size == 7
    assert (tmp_path / "1.2.3" / "1.2.3.4.dcm").read_bytes() == b"abcdefg"
    assert [p.name for p in (tmp_path / "1.2.3").iterdir()] == ["1.2.3.4.dcm"]


@pytest.mark.parametrize(("study", "sop"), [("..", "1.2"), ("1.2", "../../x"), ("1.2/3", "1.2")])
def test_path_parts_come_from_valid_uids_only(tmp_path: Path, study: str, sop: str) -> None:
    with pytest.raises(InvalidInstance):
        Spool(tmp_path).relative_path(study, sop)


def test_failed_write_leaves_no_partial_file(tmp_path: Path) -> None:
    spool = Spool(tmp_path)

    def chunks():
        yield b"first part"
        raise OSError(28, "No space left on device")

    with pytest.raises(StorageUnavailable, match="No space left"):
        spool.write("1.2/1.2.3.dcm", chunks())
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


class _Crash(BaseException):
    """The process dying mid-write: no `except` in the spool runs for it."""


def _crash_mid_write(spool: Spool, relative: str) -> None:
    def chunks():
        yield b"first half of an instance"
        raise _Crash

    with pytest.raises(_Crash):
        spool.write(relative, chunks())


def test_partial_files_of_a_crash_are_removed_and_instances_kept(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    kept = spool.relative_path("1.2.3", "1.2.3.4")
    spool.write(kept, [b"whole instance"])
    _crash_mid_write(spool, spool.relative_path("1.2.3", "1.2.3.5"))
    _crash_mid_write(spool, spool.relative_path("1.2.9", "1.2.9.1"))
    # A resend's other content kept aside (`dicomai.ingest.store`), cut short: it stayed.
    _crash_mid_write(spool, "resends/1.2.3/1.2.3.4.0123456789abcdef.dcm")
    assert len([p for p in tmp_path.rglob("*") if p.is_file()]) == 4

    assert spool.remove_partial_files() == 3
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == [tmp_path / kept]
    assert spool.remove_partial_files() == 0
