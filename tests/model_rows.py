"""A database for the assembler's tests: SQLite or PostgreSQL, with the demo model's row."""

from __future__ import annotations

import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from dicomai.db.migrate import upgrade
from dicomai.db.models import ModelState, ModelVersion
from dicomai.db.session import make_engine, make_sessionmaker

DEMO_MANIFEST = tomllib.loads(
    (Path(__file__).parents[1] / "models" / "demo-chest-nodule" / "model.toml").read_text()
)


def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL for a fixture parametrized ``["sqlite", "postgresql"]``."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'db.sqlite'}"
    return str(request.getfixturevalue("postgres_url"))


def upgraded_sessions(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[sessionmaker[Session]]:
    """Sessions on a database brought to the head revision (`database_url`), for a fixture to
    yield from; the engine is disposed after the test."""
    url = database_url(request, tmp_path)
    upgrade(url)
    engine = make_engine(url)
    try:
        yield make_sessionmaker(engine)
    finally:
        engine.dispose()


def add_model(sessions, modalities: list[str], state: ModelState = ModelState.ACTIVE) -> int:
    """The demo model as version "m" 1.0.0, taking `modalities` (all if empty); its id."""
    with sessions() as session, session.begin():
        row = ModelVersion(
            name="m",
            version="1.0.0",
            architecture="tinycnn",
            state=state,
            path="m/1.0.0",
            weights_sha256="0" * 64,
            manifest={**DEMO_MANIFEST, "applies_to": {"modalities": modalities}},
        )
        session.add(row)
        session.flush()
        return row.id
