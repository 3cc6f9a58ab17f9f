"""Training checkpoints: the state after each epoch, written atomically, and read back to resume."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from dicomai.errors import DatasetError

LAST = "last.pt"
BEST = "best.pt"


def save_checkpoint(folder: Path, name: str, state: dict[str, Any]) -> Path:
    """Write `state` (tensors, numbers, strings, lists and dicts of them) as ``folder/name``.

    The file is written under a temporary name, fsynced and renamed: a run killed mid-write
    leaves the previous checkpoint whole.
    """
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    tmp = folder / f".{name}.tmp"
    with open(tmp, "wb") as handle:
        torch.save(state, handle)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)
    return path


def load_checkpoint(folder: Path, name: str = LAST) -> dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint` (tensors only, nothing unpickled).

    Raises
    ------
    DatasetError
        If there is no checkpoint to resume from, or it is unreadable.
    """
    path = folder / name
    if not path.is_file():
        raise DatasetError(f"{path}: no checkpoint to resume from")
    try:
        state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise DatasetError(f"{path}: unreadable checkpoint: {error}".splitlines()[0]) from error
    return state
