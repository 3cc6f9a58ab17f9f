"""A database for the assembler's tests: SQLite or PostgreSQL, with the demo model's row."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from dicomai.db.models import ModelState, ModelVersion

DEMO_MANIFEST = tomllib.loads(
    (Path(__file__).parents[1] / "models" / "demo-chest-nodule" / "model.toml").read_text()
)


def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The URL for a fixture parametrized ``["sqlite", "postgresql"]``."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'db.sqlite'}"
    return str(request.getfixturevalue("postgres_url"))


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
