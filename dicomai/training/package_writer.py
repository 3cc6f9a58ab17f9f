"""From a trained network to a model package: temperature, thresholds, codes and the manifest."""

from __future__ import annotations

import csv
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


def choose_thresholds(probabilities: np.ndarray, targets: np.ndarray, task: Task) -> np.ndarray:
    """Per class, the calibrated-probability threshold maximising Youden's J, one class vs rest."""
    k = probabilities.shape[1]
    truth = targets if task is Task.MULTILABEL else np.eye(k)[targets]
    return np.array([youden_threshold(probabilities[:, c], truth[:, c]) for c in range(k)])


def read_codes(path: Path | None) -> dict[str, tuple[Code, bool | None]]:
    """A codes CSV (``name,value,scheme,meaning[,is_finding]``) as {class name: (code, finding)}.

    Raises
    ------
    DatasetError
        If the file cannot be read or a row lacks a field.
    """
    if path is None:
        return {}
    codes: dict[str, tuple[Code, bool | None]] = {}
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            for row in csv.DictReader(handle):
                try:
                    code = Code(row["value"].strip(), row["scheme"].strip(), row["meaning"].strip())
                    finding = row.get("is_finding")
                    flag = None if not finding else finding.strip().lower() in ("1", "true", "yes")
                    codes[row["name"].strip()] = (code, flag)
                except (KeyError, AttributeError) as error:
                    raise DatasetError(
                        f"{path}: needs columns name,value,scheme,meaning"
                    ) from error
    except OSError as error:
        raise DatasetError(f"{path}: cannot read: {error.strerror}") from error
    return codes


def class_specs(
    classes: tuple[str, ...],
    thresholds: np.ndarray,
    codes: dict[str, tuple[Code, bool | None]],
) -> tuple[ClassSpec, ...]:
    """Each class with its code (given, SNOMED CT Normal for a normal class, else a local code),
    whether it is a finding (every class but a normal one unless the codes file says) and its
    threshold."""
    specs = []
    for c, name in enumerate(classes):
        normal = name.strip().lower() in NORMAL_NAMES
        code, finding = codes.get(name, (None, None))
        if code is None:
            code = NORMAL_CODE if normal else Code(name.upper()[:16], LOCAL_SCHEME, name)
        specs.append(
            ClassSpec(
                name=name,
                code=code,
                threshold=round(float(thresholds[c]), 6),
                is_finding=(not normal) if finding is None else finding,
            )
        )
    return tuple(specs)


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
    """The per-epoch log as CSV, one row per epoch."""
    if not history:
        return
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)


def rounded(value: Any, digits: int = 6) -> Any:
    """Floats rounded (NaN kept), recursively through dicts and lists, for TOML and JSON."""
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [rounded(v, digits) for v in value]
    return value
