"""What an administrator installing dicomai from the docs relies on: a service with no model
says so, a listen address that cannot work names its setting, and output piped into `head`
ends quietly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from daemon import REPO, Listener, dicomai
from model_rows import add_model
from sqlalchemy import update

from dicomai.db.models import ModelState, ModelVersion
from dicomai.db.session import make_engine, make_sessionmaker

AET = "DICOMAI"
PEERS = [{"ae_title": "MODALITY", "hosts": ["127.0.0.1"]}]


def _row(table: str, check: str) -> str:
    return next(line for line in table.splitlines() if line.startswith(check))


def test_without_a_model_in_service_health_fails_and_serve_warns(tmp_path: Path) -> None:
    # The install steps once ended here: every study stored, none analysed, every check ok.
    daemon = Listener(tmp_path, AET, PEERS)
    with daemon:
        assert "no model version active or canary" in daemon.log(), daemon.log()
        bare = dicomai(daemon.config, "health", check=False)
        assert bare.returncode == 1, bare.stdout + bare.stderr
        line = _row(bare.stdout, "models")
        assert line.split()[1] == "FAIL" and "no model version active or canary" in line, line
        assert "dicomai models activate" in line, line

        sessions = make_sessionmaker(make_engine(f"sqlite:///{tmp_path / 'var' / 'dicomai.db'}"))
        # A shadow version sends nothing: still no model in service.
        add_model(sessions, ["DX"], ModelState.SHADOW)
        shadow = _row(dicomai(daemon.config, "health", check=False).stdout, "models")
        assert shadow.split()[1] == "FAIL", shadow
        with sessions() as session, session.begin():
            session.execute(update(ModelVersion).values(state=ModelState.ACTIVE))
        served = dicomai(daemon.config, "health", check=False)
        line = _row(served.stdout, "models")
        assert line.split()[1] == "ok" and "m 1.0.0 (active)" in line, served.stdout
        assert served.returncode == 0, served.stdout


@pytest.mark.parametrize("section", ["ingest", "metrics"])
def test_a_listen_host_that_does_not_resolve_names_its_setting(
    tmp_path: Path, section: str
) -> None:
    daemon = Listener(tmp_path, AET, PEERS)
    # RFC 6761: no name under .invalid resolves.
    host = "dicomai.invalid"
    text = daemon.config.read_text()
    if section == "ingest":
        text = text.replace('host = "127.0.0.1"', f'host = "{host}"')
    else:
        text += f'[metrics]\nhost = "{host}"\nport = 9999\n'
    daemon.config.write_text(text)
    dicomai(daemon.config, "db", "upgrade")
    result = dicomai(daemon.config, "serve", check=False, timeout=120)
    assert result.returncode == 2, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: cannot listen on {host}:"), result.stderr
    assert f"([{section}] host)" in last, result.stderr
    if section == "ingest":
        # `health` reported the resolver's "gaierror" for the listener, naming no setting.
        listener = _row(dicomai(daemon.config, "health", check=False).stdout, "listener")
        assert listener.split()[1] == "FAIL" and f"[ingest] host '{host}'" in listener, listener


def test_a_reader_that_stops_reading_ends_the_command_quietly(tmp_path: Path) -> None:
    # `dicomai audit list | head -1` printed "error: Broken pipe" and exited 2, the status
    # of a configuration error.
    config = tmp_path / "dicomai.toml"
    config.write_text(f'[storage]\ndir = "{tmp_path / "var"}"\n')
    dicomai(config, "db", "upgrade")
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the command writes anything
    try:
        result = subprocess.run(
            [sys.executable, "-m", "dicomai", "--config", str(config), "audit", "list"],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
            cwd=REPO,
            check=False,
        )
    finally:
        os.close(write)
    assert result.returncode == 141, result.stderr
    assert result.stderr == ""
