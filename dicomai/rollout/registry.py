"""Registering model packages (checked, copied, immutable) and changing their deployment state."""

from __future__ import annotations

import math
import shutil
import tarfile
import tempfile
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from dicomai.audit import Action, Operator, record
from dicomai.db.models import ModelVersion
from dicomai.errors import ModelPackageError, NotFound


@contextmanager
def package_folder(path: Path) -> Iterator[Path]:
    """The package at `path` as a folder: itself, or a .tar unpacked to a temporary folder."""
    if path.is_dir():
        yield path
        return
    if not path.is_file() or not tarfile.is_tarfile(path):
        raise ModelPackageError(f"{path}: not a package folder or .tar file")
    with tempfile.TemporaryDirectory() as tmp:
        try:
            with tarfile.open(path) as tar:
                # filter="data" refuses absolute paths, links out of the folder and devices.
                tar.extractall(tmp, filter="data")
        except (tarfile.TarError, EOFError) as exc:
            raise ModelPackageError(f"{path}: unusable archive: {exc}") from None
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


def register(session: Session, path: Path, registry_dir: Path, operator: Operator) -> ModelVersion:
    """Check the package at `path`, record it as registered and copy it into the registry.

    The package is copied to a folder of its own first (no lock held: on SQLite the row's
    insert holds the database's write lock, and every C-STORE waited for a copy of large
    weights), then the row is flushed, and only then, holding the name and version (a
    concurrent registration of the same waits, then fails on the unique key), is the copy
    renamed into place. Copied into place first, the loser of such a race replaced the
    winner's files under the winner's row.
    """
    with package_folder(path) as folder:
        manifest = check_package(folder)
        name, version = str(manifest["name"]), str(manifest["version"])
        already = ModelPackageError(
            f"{name} {version} is already registered; registered versions are immutable"
        )
        if find(session, name, version) is not None:
            raise already
        target = registry_dir / name / version
        staged = _staged_copy(folder, target)
    try:
        row = ModelVersion(
            name=name,
            version=version,
            architecture=str(manifest["architecture"]),
            path=f"{name}/{version}",
            weights_sha256=str(manifest["weights_sha256"]),
            manifest=manifest,
        )
        session.add(row)
        try:
            session.flush()
        except IntegrityError:
            raise already from None
        if target.exists():
            # Left by a registration whose commit failed: this transaction holds the only
            # row that may name it.
            shutil.rmtree(target)
        staged.rename(target)
    finally:
        shutil.rmtree(staged, ignore_errors=True)  # gone already, once renamed
    record(
        session,
        Action.MODEL_REGISTERED,
        actor=operator.user,
        object_type="model",
        object_id=row.label,
        source=str(path),
        weights_sha256=row.weights_sha256,
        **operator.detail(),
    )
    return row


def _staged_copy(folder: Path, target: Path) -> Path:
    """A copy of `folder` beside `target`, under a name no other registration uses."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        shutil.copytree(folder, staged, dirs_exist_ok=True)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return staged


def find(session: Session, name: str, version: str) -> ModelVersion | None:
    """The registered version `name version`, or None."""
    return session.scalar(
        select(ModelVersion).where(ModelVersion.name == name, ModelVersion.version == version)
    )


def get(session: Session, name: str, version: str) -> ModelVersion:
    """The registered version `name version`; raise NotFound if there is none."""
    row = find(session, name, version)
    if row is None:
        raise NotFound(f"model {name} {version} is not registered")
    return row


def record_evaluation(
    session: Session, name: str, version: str, evaluation: dict[str, Any], operator: Operator
) -> ModelVersion:
    """Keep the site's evaluation of `name version` on its reference set, for the gate.

    The package stays immutable; the evaluation is the site's finding about it and may be
    replaced by a newer one (each is audited).
    """
    row = get(session, name, version)
    _same_model(row, evaluation)
    row.evaluation = evaluation
    record(
        session,
        Action.MODEL_EVALUATED,
        actor=operator.user,
        object_type="model",
        object_id=row.label,
        evaluation=evaluation,
        **operator.detail(),
    )
    return row


def _same_model(row: ModelVersion, evaluation: dict[str, Any]) -> None:
    """Refuse an evaluation whose ``model`` block (as `dicomai evaluate` writes it) names another
    model: another version's report, recorded for this one, passed the gate for it.

    Compared where the evaluation gives them: name, version, architecture, temperature, the
    SHA-256 of every weights file (``weights_sha256`` the first; ``ensemble_sha256`` the
    further members, as the manifest's ``[ensemble] sha256`` lists them) and the uncertainty
    method with its number of passes or members. The first weights file alone let a 2-member
    ensemble's evaluation pass for the single model that was its first member.
    """
    model = evaluation.get("model")
    if not isinstance(model, dict):
        return
    evaluated = f"{model.get('name')} {model.get('version')}"
    subject = (
        f"of another model than {row.label} (of the same name and version)"
        if evaluated == row.label
        else f"of {evaluated}, not of {row.label}"
    )
    for what, given, expected in _identities(row, model, evaluation.get("uncertainty")):
        if given is not None and given != expected:
            raise ModelPackageError(
                f"the evaluation is {subject}: its {what} is {str(given)[:64]!r}, the "
                f"package's {str(expected)[:64]!r}"
            )


def _identities(
    row: ModelVersion, model: dict[str, Any], uncertainty: Any
) -> Iterator[tuple[str, Any, Any]]:
    """(what, the evaluation's value or None where it gives none, the package's value)."""
    from dicomai.models.manifest import Manifest

    manifest = Manifest.from_dict(row.manifest)
    for key, value in (
        ("name", row.name),
        ("version", row.version),
        ("weights_sha256", row.weights_sha256),
        ("architecture", row.architecture),
    ):
        yield key, None if model.get(key) is None else str(model[key]), value
    temperature = model.get("temperature")
    if isinstance(temperature, int | float) and not math.isclose(
        temperature, manifest.temperature, rel_tol=1e-9
    ):
        yield "temperature", temperature, manifest.temperature
    members = model.get("ensemble_sha256")
    if members is not None:
        expected = [member.sha256 for member in manifest.ensemble]
        given = members if isinstance(members, list) else [members]
        yield "number of ensemble members", 1 + len(given), 1 + len(expected)
        for index, (digest, own) in enumerate(zip(given, expected, strict=True), start=2):
            yield f"ensemble member {index}'s sha256", str(digest), own
    if isinstance(uncertainty, dict):
        method = manifest.uncertainty.method
        samples = {
            "mc_dropout": manifest.uncertainty.passes,
            "ensemble": 1 + len(manifest.ensemble),
        }
        yield "uncertainty method", uncertainty.get("method"), method
        yield "number of passes or members", uncertainty.get("samples"), samples.get(method, 1)


def list_versions(session: Session) -> list[ModelVersion]:
    return list(session.scalars(select(ModelVersion).order_by(ModelVersion.name, ModelVersion.id)))
