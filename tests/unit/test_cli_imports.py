"""The CLI imports no metrics library before `serve` can share its counters between processes."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import sys
from dicomai.cli.main import main
sys.argv = ["dicomai", "--help"]
try:
    main()
except SystemExit:
    pass
print("prometheus_client" in sys.modules)
"""


def test_loading_the_commands_leaves_prometheus_client_unimported() -> None:
    # A command module that imported it (through the delivery code) made `serve` count its
    # own process only: the embedded worker's jobs and deliveries vanished from /metrics.
    result = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, check=True
    )
    assert result.stdout.strip().splitlines()[-1] == "False", result.stdout
