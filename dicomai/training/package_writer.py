"""From a trained network to a model package: temperature, thresholds, codes and the manifest."""

from __future__ import annotations

import csv
import hashlib
import re
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import dicomai
from dicomai.errors import DatasetError
from dicomai.evaluation.metrics import youden_threshold
from dicomai.inference.types import Code
from dicomai.models.manifest import ClassSpec
from dicomai.training.datasets import Task
from dicomai.training.trainer import fit_temperature

# Codes for the "nothing found" classes, as DICOM's code dictionary holds them.
NORMAL_CODE = Code("17621005", "SCT", "Normal")
NORMAL_NAMES = ("normal", "no finding", "no_finding", "negative", "healthy")
# PS3.16 8.2: a coding scheme designator beginning "99" is private to its issuer.
LOCAL_SCHEME = "99DICOMAI"


def calibrate(logits: np.ndarray, targets: np.ndarray, multilabel: bool) -> float:
    """The temperature T that minimises the validation NLL of softmax (or sigmoid) of logits / T."""
    if not multilabel:
        return fit_temperature(torch.from_numpy(logits), torch.from_numpy(targets))
    if len(logits) == 0:
        return 1.0
    scores = torch.from_numpy(np.asarray(logits, dtype=np.float64))
    truth = torch.from_numpy(np.asarray(targets, dtype=np.float64))
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=200, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(scores / log_t.exp(), truth)
        loss.backward()
        return loss

    optimizer.step(closure)
    return float(log_t.detach().exp().clamp(0.05, 20.0))


def choose_thresholds(
    probabilities: np.ndarray, targets: np.ndarray, task: Task, positive: int = 1
) -> np.ndarray:
    """Per class, the calibrated-probability threshold maximising Youden's J, one class vs rest,
    put midway between the validation score it cuts at and the next lower one (`below_cut`).

    A binary model's two probabilities sum to one, so one threshold decides both: `positive`'s
    by Youden's J, the other's just above its complement. Chosen apart (benign 0.4827,
    malignant 0.5344) they left 38 of 600 images with both findings Absent.
    """
    k = probabilities.shape[1]
    if task is Task.BINARY:
        # Not rounded: a rounded threshold can cross a score the validation set decided by.
        scores = probabilities[:, positive]
        threshold = below_cut(scores, youden_threshold(scores, targets == positive))
        chosen = np.empty(2)
        chosen[positive] = threshold
        chosen[1 - positive] = min(1.0 - threshold + 1e-9, 1.0)
        return chosen
    truth = targets if task is Task.MULTILABEL else np.eye(k)[targets]
    return np.array(
        [
            below_cut(
                probabilities[:, c], youden_threshold(probabilities[:, c], truth[:, c]), digits=6
            )
            for c in range(k)
        ]
    )


def below_cut(scores: np.ndarray, threshold: float, digits: int | None = None) -> float:
    """A threshold equal to one of `scores` moved down, midway to the next lower distinct score.

    Youden's threshold is the score of the lowest image it flags; the daemon computes that
    score again (another batch size, memory layout, device or precision) about 1e-9 lower,
    and the image fell below its own threshold: a validated finding Absent. Midway, both
    neighbours are as far from it as the validation set allows, and every validation image is
    decided as before.

    Parameters
    ----------
    scores
        The class's validation probabilities.
    threshold
        The chosen threshold; one that is not a score (an undefined J's 0.5), or the lowest
        score, is kept as it is.
    digits
        Round to this many decimals where the rounded value still lies strictly between the
        two scores (else the midpoint is kept unrounded).

    Returns
    -------
    float
        The threshold to store.
    """
    scores = np.asarray(scores, dtype=np.float64)
    lower = scores[scores < threshold]
    if not np.any(scores == threshold) or len(lower) == 0:
        return float(threshold)
    below = float(lower.max())
    middle = (float(threshold) + below) / 2.0
    if digits is not None:
        short = round(middle, digits)
        if below < short < threshold:
            return short
    return middle


_TRUE = ("1", "true", "yes", "y")
_FALSE = ("0", "false", "no", "n")


def read_codes(path: Path | None) -> dict[str, tuple[Code, bool | None]]:
    """A codes CSV (``name,value,scheme,meaning[,is_finding]``) as {class name: (code, finding)}.

    Raises
    ------
    DatasetError
        If the file cannot be read, is not UTF-8, names a class twice, or a row lacks a field
        or has an ``is_finding`` that is neither true (1, true, yes, y) nor false (0, false,
        no, n), in any case; an empty one leaves the default.
    """
    if path is None:
        return {}
    codes: dict[str, tuple[Code, bool | None]] = {}
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            for line, row in enumerate(csv.DictReader(handle), start=2):
                name, code, flag = _code_row(path, line, row)
                if name in codes:
                    raise DatasetError(f"{path}, line {line}: class {name!r} is given twice")
                codes[name] = (code, flag)
    except OSError as error:
        raise DatasetError(f"{path}: cannot read: {error.strerror}") from error
    except UnicodeDecodeError:
        raise DatasetError(f"{path}: not UTF-8 text (save it as CSV UTF-8)") from None
    return codes


def _code_row(path: Path, line: int, row: dict[str, Any]) -> tuple[str, Code, bool | None]:
    try:
        code = Code(row["value"].strip(), row["scheme"].strip(), row["meaning"].strip())
        name = row["name"].strip()
    except (KeyError, AttributeError) as error:
        raise DatasetError(f"{path}: needs columns name,value,scheme,meaning") from error
    finding = (row.get("is_finding") or "").strip().lower()
    if finding and finding not in _TRUE + _FALSE:
        # "Y" read as false once: the model never reported its finding Present.
        raise DatasetError(
            f"{path}, line {line}: is_finding {row['is_finding']!r} is neither true "
            "(1, true, yes) nor false (0, false, no)"
        )
    return name, code, (finding in _TRUE) if finding else None


def class_specs(
    classes: tuple[str, ...],
    thresholds: np.ndarray,
    codes: dict[str, tuple[Code, bool | None]],
) -> tuple[ClassSpec, ...]:
    """Each class with its code (given, SNOMED CT Normal for a normal class, else a local code),
    whether it is a finding (every class but a normal one unless the codes file says) and its
    threshold.

    Raises
    ------
    DatasetError
        If the codes name a class the data does not have, two classes would share a code, or
        no class is a finding (the report would never say one is present).
    """
    unknown = sorted(set(codes) - set(classes))
    if unknown:
        raise DatasetError(
            f"the codes name classes the data does not have: {', '.join(map(repr, unknown))} "
            f"(classes: {', '.join(classes)})"
        )
    specs = []
    for c, name in enumerate(classes):
        normal = name.strip().lower() in NORMAL_NAMES
        code, finding = codes.get(name, (None, None))
        if code is None:
            code = NORMAL_CODE if normal else local_code(name)
        specs.append(
            ClassSpec(
                name=name,
                code=code,
                threshold=float(thresholds[c]),
                is_finding=(not normal) if finding is None else finding,
            )
        )
    by_code: dict[tuple[str, str], str] = {}
    for spec in specs:
        key = (spec.code.value, spec.code.scheme)
        if key in by_code:
            raise DatasetError(
                f"classes {by_code[key]!r} and {spec.name!r} would share the code "
                f"({key[0]}, {key[1]}): give each its own in the codes file"
            )
        by_code[key] = spec.name
    if not any(spec.is_finding for spec in specs):
        raise DatasetError(
            "no class is a finding, so the report would never say one is present: mark the "
            "finding classes is_finding=true in the codes file"
        )
    return tuple(specs)


def local_code(name: str) -> Code:
    """A class's code in dicomai's private scheme: its name in capitals, in the characters a
    code value (SH, default repertoire) may hold, and cut to 16; a name that had to be changed
    or cut ends in four characters of its digest, so that names sharing their first 16
    characters get codes of their own."""
    value = re.sub(r"[^ -\[\]-~]", "_", name.upper())  # printable ASCII but backslash
    if value == name.upper() and len(value) <= 16:
        return Code(value, LOCAL_SCHEME, name)
    digest = hashlib.sha256(name.encode()).hexdigest()[:4].upper()
    return Code(f"{value[:11]}_{digest}", LOCAL_SCHEME, name)


def positive_class(specs: tuple[ClassSpec, ...]) -> int:
    """The binary task's positive class: its only finding, else the second class."""
    findings = [i for i, spec in enumerate(specs) if spec.is_finding]
    return findings[0] if len(findings) == 1 else 1


def code_version() -> dict[str, str]:
    """dicomai's version and, when run from a git checkout, its commit (``+dirty`` if edited)."""
    version = {"dicomai": dicomai.__version__}
    root = Path(dicomai.__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return version
    version["git_commit"] = commit + ("+dirty" if dirty else "")
    return version


def write_history(path: Path, history: list[dict[str, float]]) -> None:
    """The per-epoch log as CSV, one row per epoch; replaced whole (written under a temporary
    name, then renamed), so that one read while training never sees half a file."""
    if not history:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
    tmp.replace(path)


def rounded(value: Any, digits: int = 6) -> Any:
    """Floats rounded (NaN kept), recursively through dicts and lists, for TOML and JSON."""
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [rounded(v, digits) for v in value]
    return value
