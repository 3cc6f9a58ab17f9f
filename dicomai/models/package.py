"""Model packages on disk: weights checked against the manifest, network built and loaded."""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from dicomai.errors import ModelPackageError
from dicomai.explain.gradcam import default_method, gradcam
from dicomai.models.architectures import build
from dicomai.models.manifest import (
    MANIFEST_NAME,
    AppliesTo,
    ClassSpec,
    EnsembleMember,
    Manifest,
    UncertaintySpec,
    read_manifest,
)

__all__ = [
    "AppliesTo",
    "ClassSpec",
    "LoadedModel",
    "Manifest",
    "UncertaintySpec",
    "load_model",
    "read_manifest",
    "refuse_occupied",
    "smoke_test",
    "verify_weights",
    "write_ensemble_package",
    "write_package",
]


@dataclass(frozen=True)
class LoadedModel:
    """A package's manifest and its network, weights loaded, in eval mode on the CPU.

    `members` holds every network of a deep ensemble, `module` first; it is empty otherwise.
    """

    manifest: Manifest
    module: nn.Module
    members: tuple[nn.Module, ...] = ()

    @property
    def num_classes(self) -> int:
        return len(self.manifest.classes)


def verify_weights(folder: Path, manifest: Manifest) -> None:
    """Check that the weights file's SHA-256 is the one the manifest records.

    Parameters
    ----------
    folder
        The package folder.
    manifest
        Its manifest.

    Raises
    ------
    ModelPackageError
        If the file is missing or its digest differs.
    """
    _read_verified(Path(folder), manifest)
    for member in manifest.ensemble:
        _read_verified(Path(folder), member)


def _read_verified(folder: Path, weights: Manifest | EnsembleMember) -> bytes:
    # One read serves both the digest and the load, so the bytes checked are the bytes used.
    if isinstance(weights, Manifest):
        name, expected = weights.weights_file, weights.weights_sha256
    else:
        name, expected = weights.file, weights.sha256
    path = folder / name
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ModelPackageError(f"weights_file: cannot read {path}: {error.strerror}") from error
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected:
        raise ModelPackageError(
            f"weights SHA-256 mismatch: {name} is {actual[:16]}..., "
            f"model.toml records {expected[:16]}..."
        )
    return data


def load_model(folder: Path) -> LoadedModel:
    """Read, verify and load a model package.

    The network is built from code by the manifest's architecture name; the weights file only
    supplies tensors (safetensors, or a state_dict read with ``weights_only=True``).

    Parameters
    ----------
    folder
        The package folder.

    Returns
    -------
    LoadedModel
        The manifest and the network in eval mode, on the CPU.

    Raises
    ------
    ModelPackageError
        On any problem with the manifest, the weights' digest or their fit to the network.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    module = _load_network(folder, manifest, manifest)
    members = tuple(_load_network(folder, manifest, member) for member in manifest.ensemble)
    return LoadedModel(
        manifest=manifest, module=module, members=(module, *members) if members else ()
    )


def _load_network(
    folder: Path, manifest: Manifest, weights: Manifest | EnsembleMember
) -> nn.Module:
    data = _read_verified(folder, weights)
    name = weights.weights_file if isinstance(weights, Manifest) else weights.file
    module = build(manifest.architecture, len(manifest.classes), **manifest.options)
    state = _decode_state(data, name)
    _check_fit(module, state, manifest.architecture)
    module.load_state_dict(state, strict=True)
    return module.eval()


def _decode_state(data: bytes, name: str) -> dict[str, torch.Tensor]:
    try:
        if name.endswith(".safetensors"):
            state = load_safetensors(data)
        else:
            state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (SafetensorError, RuntimeError, ValueError, EOFError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ModelPackageError(f"weights_file: {name} is unreadable: {message}") from error
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ModelPackageError(f"weights_file: {name} is not a state_dict of named tensors")
    return state


def _check_fit(module: nn.Module, state: dict[str, torch.Tensor], architecture: str) -> None:
    """Say in one line why `state` does not fit (load_state_dict's message spans many lines)."""
    expected = module.state_dict()
    problems = [f"missing {k}" for k in expected if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in expected]
    problems += [
        f"{k} has shape {tuple(state[k].shape)}, not {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise ModelPackageError(
            f"weights do not fit {architecture}: {'; '.join(problems[:3])}{more}"
        )


def write_package(
    folder: Path,
    manifest: Manifest,
    state_dict: dict[str, torch.Tensor],
    overwrite: bool = False,
) -> Manifest:
    """Write a package: the weights as safetensors, their SHA-256 and the manifest.

    Parameters
    ----------
    folder
        Destination folder, created if missing; it must be empty unless `overwrite`.
    manifest
        The manifest; its `weights_file` and `weights_sha256` are filled in here.
    state_dict
        The network's tensors (``module.state_dict()``).
    overwrite
        Replace the package in a folder that is not empty: its weights files that the new
        package does not name (an older ensemble's members) are removed, other files kept.

    Returns
    -------
    Manifest
        The manifest as written.

    Raises
    ------
    ModelPackageError
        If `folder` is not a folder, or is not empty and `overwrite` is not given.
    """
    return _write(Path(folder), manifest, [state_dict], overwrite)


def write_ensemble_package(
    folder: Path,
    manifest: Manifest,
    state_dicts: list[dict[str, torch.Tensor]],
    overwrite: bool = False,
) -> Manifest:
    """Write a deep ensemble: the first member as the package's weights, the others beside it.

    The manifest's temperature, thresholds and ``[metrics]`` are written as given: fit them on
    the members' averaged probabilities (`dicomai ensemble` does), not one member's.

    Parameters
    ----------
    folder
        Destination folder, created if missing; it must be empty unless `overwrite`.
    manifest
        The manifest; its weights, ``[ensemble]`` and ``[uncertainty] method`` are filled in.
    state_dicts
        Two or more members' tensors, all of the manifest's architecture.
    overwrite
        As for `write_package`.

    Returns
    -------
    Manifest
        The manifest as written.

    Raises
    ------
    ModelPackageError
        If `folder` is not a folder, or is not empty and `overwrite` is not given.
    """
    if len(state_dicts) < 2:
        raise ValueError(f"an ensemble needs two or more members, got {len(state_dicts)}")
    spec = replace(manifest.uncertainty, method="ensemble")
    return _write(Path(folder), replace(manifest, uncertainty=spec), state_dicts, overwrite)


def refuse_occupied(folder: Path, overwrite: bool) -> None:
    """Refuse to write a package into `folder` if it holds anything, unless told to overwrite.

    A package written over another had silently replaced a trained run's weights (an output
    path given in the place of a member's).

    Raises
    ------
    ModelPackageError
        If `folder` exists and is not a folder, or is not empty and `overwrite` is false.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ModelPackageError(f"{folder} exists and is not a folder")
    held = sorted(path.name for path in folder.iterdir()) if folder.is_dir() else []
    if held and not overwrite:
        more = f" and {len(held) - 3} more" if len(held) > 3 else ""
        raise ModelPackageError(
            f"{folder} is not empty ({', '.join(held[:3])}{more}): write the package to a new "
            "or empty folder, or overwrite the one there (--overwrite)"
        )


def _write(
    folder: Path, manifest: Manifest, states: list[dict[str, torch.Tensor]], overwrite: bool
) -> Manifest:
    """The package's weights files, then its manifest, then the files of the package it
    replaced that the new one does not name."""
    refuse_occupied(folder, overwrite)
    stale = _package_files(folder)
    folder.mkdir(parents=True, exist_ok=True)
    encoded = [_encode_state(state) for state in states]
    members = []
    for index, data in enumerate(encoded[1:], start=1):
        name = f"member{index}.safetensors"
        _write_atomically(folder / name, data)
        members.append(EnsembleMember(name, hashlib.sha256(data).hexdigest()))
    written = replace(
        manifest,
        weights_file="weights.safetensors",
        weights_sha256=hashlib.sha256(encoded[0]).hexdigest(),
        ensemble=tuple(members),
    )
    _write_atomically(folder / written.weights_file, encoded[0])
    _write_atomically(folder / MANIFEST_NAME, written.to_toml().encode("utf-8"))
    kept = {MANIFEST_NAME, written.weights_file, *(member.file for member in members)}
    for path in stale:
        if path.name not in kept:
            path.unlink(missing_ok=True)
    return written


def _package_files(folder: Path) -> list[Path]:
    """The weights files of the package in `folder`: those its manifest names, and any
    ``member*.safetensors`` (a manifest that cannot be read names none)."""
    if not folder.is_dir():
        return []
    found = set(folder.glob("member*.safetensors"))
    try:
        old = read_manifest(folder)
    except ModelPackageError:
        return sorted(found)
    found |= {folder / old.weights_file, *(folder / member.file for member in old.ensemble)}
    return sorted(found)


def _encode_state(state_dict: dict[str, torch.Tensor]) -> bytes:
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    return save_safetensors(tensors, metadata={"format": "pt"})


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    tmp.replace(path)


def smoke_test(loaded: LoadedModel) -> None:
    """Run one synthetic image through the network and its heat-map method.

    Parameters
    ----------
    loaded
        A loaded package.

    Raises
    ------
    ModelPackageError
        If the output is not finite of shape (1, number of classes), or the heat map fails
        (a method that cannot explain the network among them).
    """
    rows, cols = loaded.manifest.input.size
    generator = torch.Generator().manual_seed(0)
    device = next(loaded.module.parameters()).device
    batch = torch.randn(1, 3, rows, cols, generator=generator).to(device)
    try:
        with torch.inference_mode():
            logits = loaded.module(batch)
    except (RuntimeError, ValueError, AssertionError) as error:
        # torchvision's ViT asserts its image size: a manifest size the weights were not
        # trained for.
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ModelPackageError(
            f"smoke test: the network does not take a {rows}x{cols} input ([input] size): {first}"
        ) from None
    expected = (1, loaded.num_classes)
    if tuple(logits.shape) != expected:
        raise ModelPackageError(f"smoke test: output shape {tuple(logits.shape)}, not {expected}")
    if not torch.isfinite(logits).all():
        raise ModelPackageError("smoke test: the network's output is not finite")
    try:
        method = loaded.manifest.explanation or default_method(loaded.module)
        heatmap = gradcam(loaded.module, batch, [0], method)
    except (RuntimeError, ValueError) as error:
        raise ModelPackageError(f"smoke test: the heat map failed: {error}") from error
    if heatmap.shape != (1, rows, cols) or not np.isfinite(heatmap).all():
        raise ModelPackageError(f"smoke test: heat map of shape {heatmap.shape} or not finite")
