"""The model manifest (model.toml): what a package is, read and written without importing torch.

Kept apart from `dicomai.models.package` because the registry and the CLI read manifests in
processes that never run a model, and ``import torch`` alone costs about 4 s.
"""

from __future__ import annotations

import math
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from dicomai.errors import ModelPackageError
from dicomai.imaging.spec import InputSpec
from dicomai.inference.types import Code

MANIFEST_NAME = "model.toml"
WEIGHTS_SUFFIXES = (".safetensors", ".pt")

# semver.org 2.0 core with an optional pre-release; build metadata ("+...") is left out
# because name and version become folder names in the registry.
_VERSION = re.compile(
    r"(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(-[0-9A-Za-z-]+(\.[0-9A-Za-z-]+)*)?"
)
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# For the commands that write a package (`dicomai train`), to check before they train.
NAME_PATTERN, VERSION_PATTERN = _NAME, _VERSION
_SHA256 = re.compile(r"[0-9a-f]{64}")
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


@dataclass(frozen=True)
class ClassSpec:
    """One output of the network: its name, coded meaning and decision threshold."""

    name: str
    code: Code
    threshold: float
    is_finding: bool


@dataclass(frozen=True)
class AppliesTo:
    """Which images a model is for; an empty tuple or pattern accepts any value.

    `series_description` is a regular expression searched in Series Description (0008,103E),
    ignoring case; `view_positions` are View Position (0018,5101) values such as ``PA``.
    """

    modalities: tuple[str, ...] = ()
    body_parts: tuple[str, ...] = ()
    sop_classes: tuple[str, ...] = ()
    view_positions: tuple[str, ...] = ()
    series_description: str = ""

    def matches(
        self,
        modality: str | None,
        body_part: str | None,
        sop_class_uid: str | None,
        view_position: str | None = None,
        series_description: str | None = None,
    ) -> bool:
        """Whether an image with these attributes is in scope (compared case-insensitively)."""
        checks = (
            (self.modalities, modality),
            (self.body_parts, body_part),
            (self.sop_classes, sop_class_uid),
            (self.view_positions, view_position),
        )
        for allowed, value in checks:
            if allowed and (value or "").strip().upper() not in {a.upper() for a in allowed}:
                return False
        pattern = self.series_description
        return (
            not pattern or re.search(pattern, series_description or "", re.IGNORECASE) is not None
        )


UNCERTAINTY_METHODS = ("none", "mc_dropout", "ensemble")
# `dicomai.explain.gradcam.METHODS` (not imported: reading a manifest needs no torch).
EXPLANATION_METHODS = ("gradcam", "gradcam++", "eigencam", "layercam", "relevance")


@dataclass(frozen=True)
class UncertaintySpec:
    """How inference estimates its uncertainty (``[uncertainty]`` in model.toml).

    ``"mc_dropout"`` runs `passes` forward passes with dropout on (BatchNorm in eval), seeded
    with `seed` so a re-run gives the same numbers; ``"ensemble"`` averages the members listed
    under ``[ensemble]``; ``"none"`` runs the network once.
    """

    method: str = "none"
    passes: int = 20
    seed: int = 0


@dataclass(frozen=True)
class EnsembleMember:
    """A further member of a deep ensemble: its weights file in the package and their SHA-256."""

    file: str
    sha256: str


@dataclass(frozen=True, kw_only=True)
class Manifest:
    """The contents of a package's model.toml.

    `weights_sha256` is empty only on a manifest built in code and not yet written by
    `dicomai.models.package.write_package`; every manifest read from disk carries it.
    `multi_label` models score each class on its own (a sigmoid per output, any number of
    findings at once); the others share one softmax over their classes. `explanation` names
    the method that draws the heat maps; empty means the architecture's own choice
    (`dicomai.explain.default_method`).
    """

    name: str
    version: str
    architecture: str
    classes: tuple[ClassSpec, ...]
    options: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    weights_file: str = "weights.safetensors"
    weights_sha256: str = ""
    input: InputSpec = field(default_factory=InputSpec)
    temperature: float = 1.0
    applies_to: AppliesTo = field(default_factory=AppliesTo)
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    uncertainty: UncertaintySpec = field(default_factory=UncertaintySpec)
    # A deep ensemble's members after the first, which is `weights_file` itself.
    ensemble: tuple[EnsembleMember, ...] = ()
    multi_label: bool = False
    explanation: str = ""

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(spec.name for spec in self.classes)

    @classmethod
    def from_toml(cls, path: Path) -> Manifest:
        """Read and validate a model.toml file.

        Parameters
        ----------
        path
            The model.toml file.

        Returns
        -------
        Manifest
            The validated manifest.

        Raises
        ------
        ModelPackageError
            A one-line message naming the file and the offending field.
        """
        try:
            with open(path, "rb") as handle:
                data = tomllib.load(handle)
        except FileNotFoundError as error:
            raise ModelPackageError(f"{path}: not found") from error
        except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
            raise ModelPackageError(f"{path}: unreadable TOML: {error}") from error
        try:
            return cls.from_dict(data)
        except ModelPackageError as error:
            raise ModelPackageError(f"{path}: {error}") from error

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        """Validate parsed TOML; raise ModelPackageError naming the first bad field."""
        _reject_unknown(data, {f.name for f in fields(cls)}, "")
        return cls(
            name=_matching(data, "name", _NAME, "a name of letters, digits, '.', '_' or '-'"),
            version=_matching(data, "version", _VERSION, "a semantic version x.y.z"),
            architecture=_text(data, "architecture"),
            classes=_classes(data.get("classes")),
            options=_table(data, "options"),
            description=_text(data, "description", required=False),
            weights_file=_weights_file(data),
            weights_sha256=_matching(data, "weights_sha256", _SHA256, "64 lowercase hex digits"),
            input=_input(data),
            temperature=_temperature(data),
            applies_to=_applies_to(_table(data, "applies_to")),
            training=_table(data, "training"),
            metrics=_table(data, "metrics"),
            multi_label=_flag(data, "multi_label"),
            explanation=_explanation(data),
            **_uncertainty_and_ensemble(data),
        )

    def to_toml(self) -> str:
        """Return the manifest as TOML text that `from_toml` reads back to an equal manifest."""
        top = {
            "name": self.name,
            "version": self.version,
            "architecture": self.architecture,
            "description": self.description,
            "weights_file": self.weights_file,
            "weights_sha256": self.weights_sha256,
            "temperature": self.temperature,
            # Written only when set, so that every single-label package keeps its exact bytes.
            **({"multi_label": True} if self.multi_label else {}),
            **({"explanation": self.explanation} if self.explanation else {}),
            "options": self.options,
            "input": self.input.to_dict(),
            "applies_to": {
                "modalities": list(self.applies_to.modalities),
                "body_parts": list(self.applies_to.body_parts),
                "sop_classes": list(self.applies_to.sop_classes),
                "view_positions": list(self.applies_to.view_positions),
                "series_description": self.applies_to.series_description,
            },
            "training": self.training,
            "metrics": self.metrics,
            "uncertainty": {
                "method": self.uncertainty.method,
                "passes": self.uncertainty.passes,
                "seed": self.uncertainty.seed,
            },
        }
        if self.ensemble:
            top["ensemble"] = {
                "members": [member.file for member in self.ensemble],
                "sha256": [member.sha256 for member in self.ensemble],
            }
        lines = _toml_table(top, ())
        for spec in self.classes:
            code = {
                "value": spec.code.value,
                "scheme": spec.code.scheme,
                "meaning": spec.code.meaning,
            }
            lines += ["", "[[classes]]"]
            lines += _toml_table(
                {
                    "name": spec.name,
                    "code": code,
                    "threshold": spec.threshold,
                    "is_finding": spec.is_finding,
                },
                (),
                inline=True,
            )
        return "\n".join(lines).strip() + "\n"


def read_manifest(folder: Path) -> Manifest:
    """Read and validate ``folder/model.toml``.

    Parameters
    ----------
    folder
        The package folder.

    Returns
    -------
    Manifest
        The validated manifest.

    Raises
    ------
    ModelPackageError
        A one-line message naming the field at fault.
    """
    return Manifest.from_toml(Path(folder) / MANIFEST_NAME)


def _reject_unknown(data: dict[str, Any], known: set[str], where: str) -> None:
    # A misspelt key ("treshold") must not silently fall back to a default decision rule.
    unknown = sorted(set(data) - known)
    if unknown:
        raise ModelPackageError(f"{where}{unknown[0]}: unknown field")


def _text(data: dict[str, Any], key: str, where: str = "", required: bool = True) -> str:
    value = data.get(key)
    if value is None and not required:
        return ""
    if value is None:
        raise ModelPackageError(f"{where}{key}: missing")
    if not isinstance(value, str) or (required and not value.strip()):
        kind = "a non-empty string" if required else "a string"
        raise ModelPackageError(f"{where}{key}: must be {kind}")
    return value


def _matching(data: dict[str, Any], key: str, pattern: re.Pattern[str], what: str) -> str:
    value = _text(data, key)
    if not pattern.fullmatch(value):
        raise ModelPackageError(f"{key}: {value!r} is not {what}")
    return value


def _number(data: dict[str, Any], key: str, default: float, where: str = "") -> float:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ModelPackageError(f"{where}{key}: must be a finite number, got {value!r}")
    return float(value)


def _flag(data: dict[str, Any], key: str) -> bool:
    value = data.get(key, False)
    if not isinstance(value, bool):
        raise ModelPackageError(f"{key}: must be true or false")
    return value


def _table(data: dict[str, Any], key: str) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise ModelPackageError(f"{key}: must be a table")
    return value


def _classes(value: Any) -> tuple[ClassSpec, ...]:
    if value is None:
        raise ModelPackageError("classes: missing")
    if not isinstance(value, list) or not value:
        raise ModelPackageError("classes: must be a non-empty array of tables")
    specs = tuple(_class(entry, index) for index, entry in enumerate(value))
    names = [spec.name for spec in specs]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ModelPackageError(f"classes: duplicate name {duplicates[0]!r}")
    return specs


def _class(entry: Any, index: int) -> ClassSpec:
    where = f"classes[{index}]."
    if not isinstance(entry, dict):
        raise ModelPackageError(f"classes[{index}]: must be a table")
    _reject_unknown(entry, {f.name for f in fields(ClassSpec)}, where)
    code = entry.get("code")
    if not isinstance(code, dict):
        raise ModelPackageError(f"{where}code: must be a table with value, scheme, meaning")
    _reject_unknown(code, {"value", "scheme", "meaning"}, f"{where}code.")
    threshold = _number(entry, "threshold", 0.5, where)
    if not 0.0 <= threshold <= 1.0:
        raise ModelPackageError(f"{where}threshold: {threshold} is outside [0, 1]")
    is_finding = entry.get("is_finding")
    if not isinstance(is_finding, bool):
        raise ModelPackageError(f"{where}is_finding: must be true or false")
    return ClassSpec(
        name=_text(entry, "name", where),
        code=Code(*(_text(code, key, f"{where}code.") for key in ("value", "scheme", "meaning"))),
        threshold=threshold,
        is_finding=is_finding,
    )


def _weights_file(data: dict[str, Any], where: str = "weights_file") -> str:
    value = _text(data, "weights_file", required=False) or "weights.safetensors"
    # Only a bare file name: a manifest must not point outside its own folder.
    if Path(value).name != value or value.startswith(".") or not value.endswith(WEIGHTS_SUFFIXES):
        raise ModelPackageError(
            f"{where}: {value!r} must be a file name ending in .safetensors or .pt"
        )
    return value


def _input(data: dict[str, Any]) -> InputSpec:
    # InputSpec validates itself; its messages already name the field ("input spec: size ...").
    return InputSpec.from_dict(_table(data, "input"))


def _temperature(data: dict[str, Any]) -> float:
    temperature = _number(data, "temperature", 1.0)
    if temperature <= 0.0:
        raise ModelPackageError(f"temperature: must be positive, got {temperature}")
    return temperature


def _applies_to(table: dict[str, Any]) -> AppliesTo:
    _reject_unknown(table, {f.name for f in fields(AppliesTo)}, "applies_to.")
    lists = {}
    for key in ("modalities", "body_parts", "sop_classes", "view_positions"):
        value = table.get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise ModelPackageError(f"applies_to.{key}: must be an array of non-empty strings")
        lists[key] = tuple(value)
    pattern = _text(table, "series_description", "applies_to.", required=False)
    try:
        re.compile(pattern)
    except re.error as error:
        raise ModelPackageError(
            f"applies_to.series_description: not a regular expression: {error}"
        ) from None
    return AppliesTo(**lists, series_description=pattern)


def _explanation(data: dict[str, Any]) -> str:
    method = _text(data, "explanation", required=False)
    if method and method not in EXPLANATION_METHODS:
        raise ModelPackageError(
            f"explanation: {method!r} is not one of {', '.join(EXPLANATION_METHODS)}"
        )
    return method


def _uncertainty_and_ensemble(data: dict[str, Any]) -> dict[str, Any]:
    table = _table(data, "uncertainty")
    _reject_unknown(table, {f.name for f in fields(UncertaintySpec)}, "uncertainty.")
    method = table.get("method", "none")
    if method not in UNCERTAINTY_METHODS:
        raise ModelPackageError(
            f"uncertainty.method: {method!r} is not one of {', '.join(UNCERTAINTY_METHODS)}"
        )
    numbers = {}
    for key, default, least in (("passes", 20, 2), ("seed", 0, 0)):
        value = table.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ModelPackageError(f"uncertainty.{key}: must be an integer >= {least}")
        numbers[key] = value
    members = _ensemble(_table(data, "ensemble"))
    if (method == "ensemble") != bool(members):
        raise ModelPackageError(
            'ensemble.members: an ensemble needs uncertainty.method = "ensemble" and at least '
            "one member besides weights_file"
        )
    return {"uncertainty": UncertaintySpec(method, **numbers), "ensemble": members}


def _ensemble(table: dict[str, Any]) -> tuple[EnsembleMember, ...]:
    _reject_unknown(table, {"members", "sha256"}, "ensemble.")
    files, digests = table.get("members", []), table.get("sha256", [])
    if not isinstance(files, list) or not isinstance(digests, list) or len(files) != len(digests):
        raise ModelPackageError("ensemble: members and sha256 must be arrays of equal length")
    members = []
    for index, (name, digest) in enumerate(zip(files, digests, strict=True)):
        where = f"ensemble.members[{index}]"
        file = _weights_file({"weights_file": name}, where)
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise ModelPackageError(f"ensemble.sha256[{index}]: must be 64 lowercase hex digits")
        members.append(EnsembleMember(file, digest))
    return tuple(members)


def _toml_table(table: dict[str, Any], path: tuple[str, ...], inline: bool = False) -> list[str]:
    """TOML lines for `table` at `path`: its plain values, then its sub-tables as sections."""
    lines = [
        f"{_toml_key(k)} = {_toml_value(v)}"
        for k, v in table.items()
        if inline or not isinstance(v, dict)
    ]
    if inline:
        return lines
    for key, value in table.items():
        if isinstance(value, dict):
            sub = (*path, key)
            body = _toml_table(value, sub)
            # A table holding only sub-tables needs no header of its own.
            only_tables = value and all(isinstance(v, dict) for v in value.values())
            header = [] if only_tables else ["", f"[{'.'.join(_toml_key(k) for k in sub)}]"]
            lines += header + body
    return lines


def _toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else _toml_string(key)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return (
            "{ " + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + " }"
        )
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def _toml_string(text: str) -> str:
    # TOML 1.0 basic strings: escape the quote, the backslash and every control character.
    escaped = "".join(
        f"\\u{ord(c):04x}" if ord(c) < 0x20 or ord(c) == 0x7F else "\\" + c if c in '"\\' else c
        for c in text
    )
    return f'"{escaped}"'
