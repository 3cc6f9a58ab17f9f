"""`dicomai db upgrade` brings any older database up, on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
from alembic import command
from alembic.script import ScriptDirectory
from daemon import dicomai, write_config
from sqlalchemy import inspect, text

from dicomai.db.migrate import alembic_config, current_revision, upgrade
from dicomai.db.session import make_engine


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'db.sqlite'}"
    return request.getfixturevalue("postgres_url")


def revisions(url: str) -> list[str]:
    script = ScriptDirectory.from_config(alembic_config(url))
    return [r.revision for r in reversed(list(script.walk_revisions()))]


def test_every_older_revision_upgrades_to_head(url: str) -> None:
    *older, head = revisions(url)
    assert older, "expected more than one migration"
    engine = make_engine(url)
    for revision in older:
        upgrade(url, revision)
        assert current_revision(engine) == revision
    upgrade(url)
    assert current_revision(engine) == head
    assert "association_ended_at" in {c["name"] for c in inspect(engine).get_columns("studies")}
    engine.dispose()


def test_models_and_migrations_agree(url: str) -> None:
    upgrade(url)
    command.check(alembic_config(url))


def test_a_schema_newer_than_this_version_is_one_line_not_a_traceback(tmp_path) -> None:
    """After a downgrade of dicomai the database holds a revision it does not know:
    `db upgrade` cannot help, and `serve` must not say that it can."""
    url = f"sqlite:///{tmp_path / 'var' / 'dicomai.db'}"
    upgrade(url)
    engine = make_engine(url)
    with engine.begin() as connection:
        connection.execute(text("UPDATE alembic_version SET version_num = '0099'"))
    engine.dispose()
    config = write_config(
        tmp_path / "dicomai.toml", {"storage": {"dir": str(tmp_path / "var")}}, {}
    )
    for command_line in (("db", "upgrade"), ("serve",)):
        result = dicomai(config, *command_line, check=False, timeout=60)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, result.stderr
        assert "schema 0099 is newer than this dicomai knows" in lines[0], lines


def test_instances_received_before_0005_are_marked_by_sop_class(url: str) -> None:
    # Without it, a PDF or SR stored before the upgrade went to the next job of its study.
    upgrade(url, "0004")
    engine = make_engine(url)
    rows = {"1.9.1": "1.2.840.10008.5.1.4.1.1.104.1", "1.9.2": "1.2.840.10008.5.1.4.1.1.1.1"}
    with engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO studies (id, study_uid, state, instance_count, first_received_at,"
                " last_received_at) VALUES (1, '1.9', 'complete', 2, :now, :now)"
            ),
            {"now": "2026-11-24 10:00:00"},
        )
        for uid, sop_class in rows.items():
            connection.execute(
                text(
                    "INSERT INTO instances (study_id, sop_instance_uid, sop_class_uid,"
                    " series_uid, transfer_syntax_uid, path, size, sha256, received_at)"
                    " VALUES (1, :uid, :sop_class, '1.9.0', '1.2.840.10008.1.2.1', :uid, 1,"
                    " '0', :now)"
                ),
                {"uid": uid, "sop_class": sop_class, "now": "2026-11-24 10:00:00"},
            )
    upgrade(url)
    with engine.connect() as connection:
        marks = dict(
            connection.execute(text("SELECT sop_instance_uid, not_applicable FROM instances")).all()
        )
    engine.dispose()
    assert marks == {"1.9.1": "not an image (Encapsulated PDF Storage)", "1.9.2": None}
