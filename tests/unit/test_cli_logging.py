"""Commands that read no settings (`evaluate`, `train`) log through the same redacting handler as
the daemon: a library's warning quoting a header value reached the terminal as it was."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file
from test_evaluate_not_evaluated import write_noise_pngs, write_tiny_package

from dicomai.imaging.spec import InputSpec

MARKER = "ISO_IR 999"


def test_evaluate_redacts_a_library_warning_that_quotes_a_header_value(tmp_path: Path) -> None:
    package = write_tiny_package(tmp_path / "package", InputSpec(size=(32, 32)))
    write_noise_pngs(tmp_path / "data", per_class=2)
    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ct.SpecificCharacterSet = MARKER  # pydicom warns "Unknown encoding 'ISO_IR 999'"
    ct.save_as(tmp_path / "data" / "test" / "nodule" / "ct.dcm", enforce_file_format=True)

    done = subprocess.run(
        [sys.executable, "-m", "dicomai", "evaluate", str(package), "--data",
         str(tmp_path / "data"), "--out", str(tmp_path / "report")],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip

    assert done.returncode == 0, done.stderr
    assert "Unknown encoding '<redacted>'" in done.stderr, done.stderr
    assert MARKER not in done.stderr + done.stdout
