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


_SEED = (
    "INSERT INTO model_versions (id, name, version, architecture, state, path, weights_sha256,"
    " manifest, registered_at, state_changed_at)"
    " VALUES (1, 'm', '1', 'tinycnn', 'active', '/m', 'ab', '{}', :t, :t)",
    "INSERT INTO studies (id, study_uid, state, instance_count, first_received_at,"
    " last_received_at) VALUES (1, '1.2.3', 'complete', 1, :t, :t)",
    "INSERT INTO instances (id, study_id, sop_instance_uid, sop_class_uid, series_uid,"
    " transfer_syntax_uid, path, size, sha256, received_at) VALUES (1, 1, '1.2.3.4',"
    " '1.2.840.10008.5.1.4.1.1.7', '1.2.3.5', '1.2.840.10008.1.2.1', '/i', 1, 'ab', :t)",
    "INSERT INTO jobs (id, study_id, model_version_id, input_digest, state, attempts,"
    " created_at) VALUES (1, 1, 1, 'd', 'done', 1, :t)",
    "INSERT INTO output_objects (id, job_id, kind, sop_instance_uid, sop_class_uid, series_uid,"
    " path, created_at) VALUES (1, 1, 'sr', '1.2.9', '1.2.840.10008.5.1.4.1.1.88.34',"
    " '1.2.9.1', '/o', :t)",
    "INSERT INTO predictions (job_id, instance_id, label, probability, positive, evaluated)"
    " VALUES (1, 1, 'nodule', 0.5, true, true)",
    "INSERT INTO deliveries (output_id, destination, state, attempts, next_attempt_at)"
    " VALUES (1, 'pacs', 'failed', 3, :t)",
)
_TABLES = ("model_versions", "studies", "instances", "jobs", "output_objects", "predictions")


def test_a_database_in_use_at_each_older_revision_upgrades_with_its_rows(
    url: str, tmp_path
) -> None:
    # On SQLite, 0003 rebuilds model_versions, which jobs reference: with foreign keys
    # enforced the upgrade of any database holding a job failed half-way, and every later
    # upgrade failed on the columns it had already added.
    *older, _ = revisions(url)
    for revision in older:
        fresh = url if url.startswith("postgresql") else url.replace("db.sqlite", f"{revision}.db")
        engine = make_engine(fresh)
        if fresh.startswith("postgresql"):
            with engine.begin() as connection:
                connection.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
        upgrade(fresh, revision)
        with engine.begin() as connection:
            for statement in _SEED:
                connection.execute(text(statement), {"t": "2026-01-01 00:00:00+00:00"})
        config = write_config(
            tmp_path / f"{revision}.toml",
            {"database": {"url": fresh}, "storage": {"dir": str(tmp_path / "var")}},
            {},
        )
        result = dicomai(config, "db", "upgrade", check=False, timeout=120)
        assert result.returncode == 0, f"from {revision}: {result.stderr}"
        with engine.connect() as connection:
            counts = [connection.scalar(text(f"SELECT count(*) FROM {t}")) for t in _TABLES]
            assert counts == [1] * len(_TABLES), f"from {revision}: {counts}"
        listed = dicomai(config, "jobs", "list", check=False, timeout=120)
        assert listed.returncode == 0 and "m 1" in listed.stdout, listed.stderr
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


def test_commands_on_an_old_missing_or_foreign_database_say_what_to_do(tmp_path) -> None:
    def run(url: str, *command_line: str):
        config = write_config(
            tmp_path / "dicomai.toml",
            {"database": {"url": url}, "storage": {"dir": str(tmp_path / "var")}},
            {},
        )
        result = dicomai(config, *command_line, check=False, timeout=120)
        return result.returncode, result.stderr.strip()

    # An old schema: `jobs list` failed on a missing column, with no word of the upgrade.
    old = f"sqlite:///{tmp_path / 'old.db'}"
    upgrade(old, "0002")
    for command_line in (("jobs", "list"), ("audit", "verify")):
        code, error = run(old, *command_line)
        assert code == 2 and error == (
            "error: the database schema is not current: run `dicomai db upgrade`"
        ), error

    # A mistyped path: `serve` and `health` created an empty database there.
    missing = tmp_path / "typo" / "dicomai.db"
    for command_line in (("serve",), ("jobs", "list")):
        code, error = run(f"sqlite:///{missing}", *command_line)
        assert code == 2 and f"database {missing} does not exist" in error, error
    # ... and `health`, as root before the first start, left root-owned storage folders.
    code, _ = run(f"sqlite:///{missing}", "health")
    assert code == 1 and not missing.exists() and not (tmp_path / "var").exists()

    # Another application's database: `db upgrade` added dicomai's tables to it.
    foreign = tmp_path / "ris.db"
    engine = make_engine(f"sqlite:///{foreign}")
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE patients (id INTEGER PRIMARY KEY)"))
    code, error = run(f"sqlite:///{foreign}", "db", "upgrade")
    assert code == 2 and "holds tables (patients) but not dicomai's schema" in error, error
    assert inspect(engine).get_table_names() == ["patients"]
    engine.dispose()
