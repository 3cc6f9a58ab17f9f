"""A job that fails because the database went away is one log line, not a traceback."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from sqlalchemy.exc import OperationalError

from dicomai.config import load_settings
from dicomai.db.migrate import upgrade
from dicomai.db.session import make_engine, make_sessionmaker
from dicomai.jobs.claims import Claim
from dicomai.jobs.runner import JobRunner


def test_a_database_outage_fails_the_job_in_one_line_without_its_statement(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Logged with its traceback, the error printed the failed statement and the server's
    # address, at every attempt of every job running during the outage.
    settings = load_settings(None, storage={"dir": tmp_path / "var"})
    upgrade(settings.database_url)
    runner = JobRunner(settings, make_sessionmaker(make_engine(settings.database_url)), "cpu")
    claim = Claim(7, "1.2.3", "digest", 1, "model", False, ())
    outage = OperationalError(
        "UPDATE jobs SET state=%(state)s", {"state": "done"}, ConnectionError("db.example:5432")
    )
    with caplog.at_level(logging.ERROR, logger="dicomai.jobs.runner"):
        runner._fail(claim, outage)

    failures = [r for r in caplog.records if "job 7 failed" in r.getMessage()]
    assert [r.getMessage() for r in failures] == ["job 7 failed: OperationalError"]
    assert not failures[0].exc_info, "the outage was logged with its traceback"
    assert "UPDATE jobs" not in caplog.text and "db.example" not in caplog.text
