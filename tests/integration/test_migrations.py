"""`dicomai db upgrade` brings any older database up, on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
from alembic import command
from alembic.script import ScriptDirectory
from sqlalchemy import inspect

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
