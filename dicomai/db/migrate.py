"""Schema migrations: bring any older database up to the newest revision with Alembic."""

from __future__ import annotations

import contextlib
import os
import sys
import sysconfig
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine

from dicomai.errors import ConfigError

# In a checkout the migrations folder sits at the top of the repository, beside the package
# (DESIGN.md layout); a wheel installs it as data under the environment's prefix.
_CHECKOUT = Path(__file__).resolve().parents[2] / "migrations"


def migrations_folder() -> Path:
    """The Alembic folder: the checkout's, else the installed one.

    Raises
    ------
    ConfigError
        Neither exists (an installation without its migrations cannot check its schema).
    """
    places = [_CHECKOUT]
    places += [Path(p) / "share" / "dicomai" / "migrations" for p in _install_prefixes()]
    for place in places:
        # Our first revision marks the folder as dicomai's: in an installed wheel the
        # checkout's place is site-packages, where another package may have its migrations/.
        if (place / "versions" / "0001_initial_schema.py").is_file():
            return place
    raise ConfigError(
        f"database migrations not found (looked in {', '.join(map(str, places))}): "
        "reinstall dicomai"
    )


def _install_prefixes() -> list[str]:
    # pip's data scheme: the environment's prefix, the user's for `pip install --user`, and the
    # base installation's for a venv made with --system-site-packages.
    prefixes = [sys.prefix, sysconfig.get_path("data"), sys.base_prefix]
    with contextlib.suppress(KeyError):  # a platform without a user scheme
        prefixes.append(sysconfig.get_path("data", f"{os.name}_user"))
    return list(dict.fromkeys(prefixes))


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(migrations_folder()))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Apply every migration up to `revision`."""
    command.upgrade(alembic_config(url), revision)


def head_revision(url: str) -> str | None:
    return ScriptDirectory.from_config(alembic_config(url)).get_current_head()


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def require_current(engine: Engine, url: str) -> None:
    """Refuse to run on a schema older (or newer) than this version's.

    Raises
    ------
    ConfigError
        The schema is not the newest: ``dicomai db upgrade`` brings it up.
    """
    current = current_revision(engine)
    if current != head_revision(url):
        newer_schema(current, url)
        raise ConfigError("the database schema is not current: run `dicomai db upgrade`")


def newer_schema(revision: str | None, url: str) -> None:
    """Raise if `revision` is one this dicomai does not know: a newer version's schema (after
    a downgrade), which no command of this version can bring up.

    Raises
    ------
    ConfigError
        Naming the revision, and what to do.
    """
    if revision is None:
        return
    try:
        ScriptDirectory.from_config(alembic_config(url)).get_revision(revision)
    except Exception:  # alembic's "Can't locate revision" and kin
        raise ConfigError(
            f"the database schema {revision} is newer than this dicomai knows (newest "
            f"{head_revision(url)}): run the dicomai version that wrote it, or restore the "
            "database from before"
        ) from None
