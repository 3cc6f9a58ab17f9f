"""Initial weights from a local file: torchvision ImageNet state_dicts and CheXNet checkpoints."""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from dicomai.errors import ModelPackageError

# Classification heads of torchvision's networks (ResNet, DenseNet/EfficientNet, ViT), and
# CheXNet's: trained for other classes, so never copied into our heads.
_HEAD_PREFIXES = ("fc.", "classifier.", "heads.")
# CheXNet (arnoweng/CheXNet) saved a DataParallel-wrapped model with torchvision < 0.3's
# layer names: "module.densenet121.features.denseblock1.denselayer1.norm.1.weight".
_CHEXNET_PREFIX = "module.densenet121."
_OLD_DENSE_LAYER_NAME = re.compile(r"\.(norm|relu|conv)\.(\d)\.")
# torchvision's published DenseNet files keep those names too; torchvision renames them as it
# loads one (`torchvision.models.densenet._load_state_dict`, whose pattern this is).
_OLD_TORCHVISION_DENSE_KEY = re.compile(
    r"^(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var))$"
)


# What DataParallel puts before every key of a model saved while wrapped in it.
_PARALLEL_PREFIX = "module."


def chexnet_key(key: str) -> str:
    """A CheXNet checkpoint key under torchvision's DenseNet-121 names."""
    key = key.removeprefix(_CHEXNET_PREFIX).removeprefix(_PARALLEL_PREFIX)
    return _OLD_DENSE_LAYER_NAME.sub(r".\1\2.", key)


def load_initial_weights(
    model: nn.Module, path: Path, kind: Literal["torchvision", "chexnet"] = "torchvision"
) -> list[str]:
    """Copy pretrained backbone tensors from a local file into `model`, heads excepted.

    A key is looked up in `model` as it is, then under each of the model's top-level children
    (``resnet.``, ``densenet.``, ``encoder.``…), so a ResNet-50 or DenseNet-121 file initialises
    the matching backbone of a composite network. Nothing is downloaded.

    Parameters
    ----------
    model
        The network, e.g. from `dicomai.models.architectures.build`.
    path
        A state_dict saved by ``torch.save`` (read with ``weights_only=True``) or safetensors;
        a CheXNet checkpoint may hold it under ``"state_dict"``.
    kind
        ``"torchvision"`` for torchvision's names, ``"chexnet"`` for a CheXNet DenseNet-121.

    Returns
    -------
    list[str]
        The names in `model` that were loaded.

    Raises
    ------
    ModelPackageError
        If the file is missing or unreadable, fits the model only in part, or holds
        tensors (its head's excepted) that fit nothing in it.
    """
    state = _read_state(Path(path))
    if kind == "chexnet":
        state = {chexnet_key(key): value for key, value in state.items()}
    elif kind == "torchvision":
        state = {
            _OLD_TORCHVISION_DENSE_KEY.sub(r"\1\2", key.removeprefix(_PARALLEL_PREFIX)): value
            for key, value in state.items()
        }
    else:
        raise ModelPackageError(f"initial weights: unknown kind {kind!r} (torchvision, chexnet)")
    own = model.state_dict()
    prefixes = ["", *(f"{name}." for name, _ in model.named_children())]
    updates: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    unused: list[str] = []
    for key, value in state.items():
        if key.startswith(_HEAD_PREFIXES):
            continue
        fitted = False
        for prefix in prefixes:
            target = prefix + key
            if target in own and own[target].shape == value.shape:
                updates[target] = value
                used.add(prefix)
                fitted = True
        if not fitted:
            unused.append(key)
    if not updates:
        raise ModelPackageError(
            f"initial weights: no tensor of {path} fits {type(model).__name__} (kind {kind})"
        )
    _refuse_partial(own, updates, used, path, getattr(model, "head_modules", ()))
    if unused:
        # A ResNet-101 file in a ResNet-50 filled every tensor and left 306 of its own
        # unread, under a package that said it started from that network.
        raise ModelPackageError(
            f"initial weights: {len(unused)} of the {len(state)} tensors of {path} fit "
            f"nothing in {type(model).__name__} ({unused[0]} and {len(unused) - 1} more): "
            "weights of a larger network of the family, or of another architecture"
        )
    model.load_state_dict(updates, strict=False)
    return sorted(updates)


def _refuse_partial(
    own: dict[str, torch.Tensor],
    updates: dict[str, torch.Tensor],
    used: set[str],
    path: Path,
    new_modules: tuple[str, ...] = (),
) -> None:
    """Refuse a file that fits a backbone in part: the rest would train from random values
    under a package that says it started from these weights (a ResNet-18 file in a ResNet-34
    left 82 tensors random; a ViT file for another image size, its position embeddings).

    Every tensor of each part the file initialised (the whole network, or one backbone of a
    composite) must come from it, its head and a composite network's own new modules
    (`new_modules`: projections, gates, attention) excepted: those no pretrained file has.
    """
    own_new = tuple(f"{name}." for name in new_modules)
    for prefix in sorted(used):
        expected = [
            key
            for key in own
            if key.startswith(prefix)
            and not key.removeprefix(prefix).startswith((*_HEAD_PREFIXES, "head."))
            and not key.startswith(own_new)
            # A counter, not a weight: files saved before torch 0.4.1 (torchvision's
            # published ones among them) have none.
            and not key.endswith("num_batches_tracked")
        ]
        missing = [key for key in expected if key not in updates]
        if missing:
            where = f"`{prefix.rstrip('.')}`" if prefix else "the network"
            raise ModelPackageError(
                f"initial weights: {path} fits only {len(expected) - len(missing)} of the "
                f"{len(expected)} tensors of {where} ({missing[0]} and {len(missing) - 1} "
                "more would start random): weights of another architecture, size or input "
                "size"
            )


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ModelPackageError(f"initial weights: {path} not found")
    try:
        if path.suffix == ".safetensors":
            data: object = load_file(path)
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    # Not a torch file at all: pickle's own errors (KeyError, UnpicklingError) as well.
    except (
        SafetensorError,
        RuntimeError,
        ValueError,
        EOFError,
        OSError,
        KeyError,
        pickle.UnpicklingError,
    ) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        if isinstance(error, pickle.UnpicklingError | KeyError):
            message = "not a torch state_dict or safetensors file"
        raise ModelPackageError(f"initial weights: {path} is unreadable: {message}") from error
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items()
    ):
        raise ModelPackageError(f"initial weights: {path} is not a state_dict of named tensors")
    return data
