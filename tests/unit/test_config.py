"""Settings: defaults < TOML file < DICOMAI_* environment; bad values give one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicomai.config import load_settings
from dicomai.errors import ConfigError


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "dicomai.toml"
    path.write_text(text)
    return path


def test_defaults_without_file_or_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DICOMAI_CONFIG", raising=False)
    settings = load_settings()
    assert settings.ingest.ae_title == "DICOMAI"
    assert settings.ingest.port == 11112
    assert settings.ingest.allow_any is False
    assert settings.database_url.startswith("sqlite:///")
    assert settings.embedded_broker


def test_file_overrides_defaults_and_environment_overrides_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = write(
        tmp_path,
        '[ingest]\nport = 4242\nae_title = "FROMFILE"\n'
        '[[ingest.peers]]\nae_title = "CT1"\nhosts = ["10.0.0.0/8"]\n',
    )
    monkeypatch.setenv("DICOMAI_INGEST__PORT", "5555")
    settings = load_settings(config)
    assert settings.ingest.port == 5555
    assert settings.ingest.ae_title == "FROMFILE"
    assert settings.ingest.peers[0].hosts == ["10.0.0.0/8"]


def test_config_file_named_by_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DICOMAI_CONFIG", str(write(tmp_path, "[storage]\ndir = '/srv/x'\n")))
    assert load_settings().storage.dir == Path("/srv/x")


PACS = "[[destinations]]\nname = 'pacs'\nae_title = {ae}\nhost = {host}\nport = 104\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[ingest]\nport = 'many'\n", "ingest.port"),
        ("[ingest]\nae_title = 'MUCH_TOO_LONG_AE_TITLE'\n", "ingest.ae_title"),
        (
            "[[destinations]]\nname = 'pacs'\nhost = 'x'\n",
            "either ae_title, host and port, or path",
        ),
        ("[nonsense]\nx = 1\n", "nonsense"),
        ("[ingest\nport = 1\n", "invalid config file"),
        # A typo in a known table is an error, not the default silently kept.
        ("[ingest]\nstudy_quit_seconds = 3\n", "unknown setting ingest.study_quit_seconds"),
        # Accepted before, then every job failed (or the worker would not start).
        ("uid_root = '1.2.3.abc'\n", "uid_root must be a UID"),
        ("uid_root = '1.2.840.10008.9999999999999999999999999999999999999'\n", "at most 47"),
        (
            "[[destinations]]\nname = 'pacs'\npath = '/tmp/a'\n"
            "[[destinations]]\nname = 'pacs'\npath = '/tmp/b'\n",
            "invalid setting: destinations: the name 'pacs' is given twice",
        ),
        ("[broker]\nurl = 'htp://redis:6379/0'\n", "redis://"),
        ("[ingest]\nstudy_quiet_seconds = -3\n", "ingest.study_quiet_seconds"),
        ("[ingest]\nport = 70000\n", "ingest.port"),
        ("[metrics]\nport = 99999\n", "metrics.port"),
        ("[[ingest.peers]]\nae_title = 'CT'\nhosts = ['10.0.0.300/8']\n", "10.0.0.300/8"),
        ("[worker]\ndevice = 'gpu9'\n", "device must be auto, cpu, cuda or cuda:N"),
        ("[database]\nurl = 'notaurl'\n", "not a database URL"),
        ("log_level = 'verbose'\n", "log_level must be one of"),
        ("[delivery]\nmax_attempts = 0\n", "delivery.max_attempts"),
        # Destinations that loaded and then failed every delivery with an exception's name.
        (PACS.format(ae="'PACS_ARCHIVE_MAIN'", host="'pacs'"), "1 to 16 printable ASCII"),
        (PACS.format(ae="'PACS\\\\1'", host="'pacs'"), "without backslash"),
        (PACS.format(ae="''", host="'pacs'"), "1 to 16 printable ASCII"),
        (PACS.format(ae="'PACS'", host="'dicom://pacs'"), "not an IP address or host name"),
        (PACS.format(ae="'PACS'", host="'pacs main'"), "not an IP address or host name"),
        ("[[destinations]]\nname = ''\npath = '/tmp/a'\n", "a destination needs a name"),
        # Accepted, then `serve` stopped with "Name or service not known", naming no setting.
        ("[ingest]\nhost = 'not a host!'\n", "invalid setting ingest.host: host 'not a host!'"),
        ("[metrics]\nhost = 'http://0.0.0.0'\n", "invalid setting metrics.host"),
        (
            "[[destinations]]\nname = 'pacs'\npath = '/tmp/a'\nae_title = 'PACS'\n",
            "or path, not both",
        ),
    ],
)
def test_bad_configuration_is_one_clear_error(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        load_settings(write(tmp_path, text))
    assert message in str(raised.value)
    assert "\n" not in str(raised.value)


def test_missing_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_settings(tmp_path / "absent.toml")


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1"])
def test_worker_devices_a_site_can_name(tmp_path: Path, device: str) -> None:
    assert (
        load_settings(write(tmp_path, f"[worker]\ndevice = '{device}'\n")).worker.device == device
    )


def test_unknown_nested_environment_key_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DICOMAI_INGEST__PORTT", "1")
    # Said without naming the variable, the administrator searched the file for it.
    with pytest.raises(
        ConfigError,
        match=r"unknown setting ingest\.portt \(from the environment: DICOMAI_INGEST__PORTT\)",
    ):
        load_settings(write(tmp_path, ""))


@pytest.mark.parametrize("name", ["DICOMAI_INGST__PORT", "DICOMAI_LOGLEVEL"])
def test_an_environment_variable_of_no_setting_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    monkeypatch.setenv(name, "5")
    with pytest.raises(ConfigError, match=f"unknown setting in the environment: {name}"):
        load_settings(write(tmp_path, ""))


def test_log_level_in_any_case_and_peer_host_names(tmp_path: Path) -> None:
    settings = load_settings(
        write(
            tmp_path,
            "log_level = 'debug'\n[[ingest.peers]]\nae_title = 'CT'\n"
            "hosts = ['ct-1.radiology.example', '10.1.2.3', 'fd00::/8', 'pacs_1.local']\n",
        )
    )
    assert settings.log_level == "DEBUG"
    assert settings.ingest.peers[0].hosts[0] == "ct-1.radiology.example"
    assert load_settings(write(tmp_path, "log_level = 'critical'\n")).log_level == "CRITICAL"


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "", "localhost", "dicomai-1.radiology.example"])
def test_listen_hosts_a_site_can_name(tmp_path: Path, host: str) -> None:
    text = f"[ingest]\nhost = '{host}'\n[metrics]\nhost = '{host}'\n"
    settings = load_settings(write(tmp_path, text))
    # Empty is every interface; the metrics server takes it spelt out.
    assert (settings.ingest.host, settings.metrics.host) == (host, host or "0.0.0.0")
