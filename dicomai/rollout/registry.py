"""Registering model packages (checked, copied, immutable) and changing their deployment state."""

from __future__ import annotations

import shutil
import tarfile
import tempfile
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from dicomai.audit import Action, record
from dicomai.db.models import ModelState, ModelVersion, utcnow
from dicomai.errors import InvalidTransition, ModelPackageError, NotFound


@contextmanager
def package_folder(path: Path) -> Iterator[Path]:
    """The package at `path` as a folder: itself, or a .tar unpacked to a temporary folder."""
    if path.is_dir():
        yield path
        return
    if not path.is_file() or not tarfile.is_tarfile(path):
        raise ModelPackageError(f"{path}: not a package folder or .tar file")
    with tempfile.TemporaryDirectory() as tmp, tarfile.open(path) as tar:
        # filter="data" refuses absolute paths, links out of the folder and device files.
        tar.extractall(tmp, filter="data")
        manifests = list(Path(tmp).rglob("model.toml"))
        if len(manifests) != 1:
            raise ModelPackageError(f"{path}: expected one model.toml in the archive")
        yield manifests[0].parent


def check_package(folder: Path) -> dict[str, object]:
    """Check a package fully (manifest, SHA-256, strict load, one inference); return its manifest.

    Raises
    ------
    ModelPackageError
        The first problem found, in one line.
    """
    from dicomai.models.package import load_model, smoke_test

    smoke_test(load_model(folder))
    with open(folder / "model.toml", "rb") as handle:
        return tomllib.load(handle)


def register(session: Session, path: Path, registry_dir: Path, actor: str) -> ModelVersion:
    """Check the package at `path`, copy it into the registry and record it as registered."""
    with package_folder(path) as folder:
        manifest = check_package(folder)
        name, version = str(manifest["name"]), str(manifest["version"])
        if find(session, name, version) is not None:
            raise ModelPackageError(
                f"{name} {version} is already registered; registered versions are immutable"
            )
        target = registry_dir / name / version
        _copy_atomically(folder, target)
    row = ModelVersion(
        name=name,
        version=version,
        architecture=str(manifest["architecture"]),
        path=f"{name}/{version}",
        weights_sha256=str(manifest["weights_sha256"]),
        manifest=manifest,
    )
    session.add(row)
    session.flush()
    record(
        session,
        Action.MODEL_REGISTERED,
        actor=actor,
        object_type="model",
        object_id=row.label,
        source=str(path),
    )
    return row


def _copy_atomically(folder: Path, target: Path) -> None:
    if target.exists():
        # Left by a registration whose commit failed: no row names it.
        shutil.rmtree(target)
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(folder, tmp)
    tmp.rename(target)


def find(session: Session, name: str, version: str) -> ModelVersion | None:
    return session.scalar(
        select(ModelVersion).where(ModelVersion.name == name, ModelVersion.version == version)
    )


def get(session: Session, name: str, version: str) -> ModelVersion:
    row = find(session, name, version)
    if row is None:
        raise NotFound(f"model {name} {version} is not registered")
    return row


def activate(
    session: Session, name: str, version: str, actor: str, reason: str = ""
) -> ModelVersion:
    """Make `name version` the active version; the previously active one is retired."""
    row = get(session, name, version)
    if row.state == ModelState.ACTIVE:
        return row
    if row.state == ModelState.RETIRED:
        raise InvalidTransition(f"{row.label} is retired; register a new version instead")
    for other in session.scalars(
        select(ModelVersion).where(
            ModelVersion.name == name, ModelVersion.state == ModelState.ACTIVE
        )
    ):
        _set_state(session, other, ModelState.RETIRED, Action.MODEL_RETIRED, actor, reason)
    _set_state(session, row, ModelState.ACTIVE, Action.MODEL_ACTIVATED, actor, reason)
    return row


def _set_state(
    session: Session, row: ModelVersion, state: ModelState, action: Action, actor: str, reason: str
) -> None:
    previous = row.state
    row.state = state
    row.state_changed_at = utcnow()
    record(
        session,
        action,
        actor=actor,
        object_type="model",
        object_id=row.label,
        previous=previous.value,
        state=state.value,
        reason=reason,
    )


def list_versions(session: Session) -> list[ModelVersion]:
    return list(session.scalars(select(ModelVersion).order_by(ModelVersion.name, ModelVersion.id)))
