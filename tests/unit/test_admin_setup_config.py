"""A listen address that cannot work names the setting to fix, whatever the OS said."""

from __future__ import annotations

import errno
import socket

import pytest

from dicomai.config import load_settings
from dicomai.daemon import _listening
from dicomai.errors import ConfigError


@pytest.mark.parametrize(
    ("error", "key"),
    [
        (socket.gaierror(socket.EAI_NONAME, "Name or service not known"), "host"),
        (OSError(errno.EADDRNOTAVAIL, "Cannot assign requested address"), "host"),
        (OSError(errno.EADDRINUSE, "Address already in use"), "port"),
    ],
    ids=["unresolved", "not-this-machine", "taken"],
)
def test_a_bind_failure_names_the_setting_behind_it(error: OSError, key: str) -> None:
    with pytest.raises(ConfigError) as raised, _listening("[metrics]", "pacs-gw", 9100):
        raise error
    assert str(raised.value) == f"cannot listen on pacs-gw:9100 ([metrics] {key}): {error.strerror}"


def test_other_errors_are_not_taken_for_the_settings() -> None:
    with pytest.raises(PermissionError), _listening("[ingest]", "0.0.0.0", 11112):
        raise PermissionError(errno.EACCES, "Permission denied", "/var/lib/dicomai/spool")


def test_an_empty_metrics_host_is_every_interface_as_for_ingest() -> None:
    # It loaded, then serve would not start: "cannot listen on :19531 ([metrics] host)".
    settings = load_settings(None, metrics={"host": "", "port": 19531}, ingest={"host": ""})
    assert settings.metrics.host == "0.0.0.0"
    assert settings.ingest.host == ""
