"""Network architectures, built from code by name (never unpickled from a package)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from itertools import pairwise
from typing import Any

import torch
from torch import nn

from dicomai.errors import ModelPackageError
from dicomai.models.hybrid import HybridResNetDenseNet
from dicomai.models.multitask import ResNetMultiTask
from dicomai.models.torchvision_zoo import ZOO
from dicomai.models.transformer import DenseNetTransformer

Builder = Callable[..., nn.Module]


class TinyCNN(nn.Module):
    """A small CNN (~100 k parameters) for the demo model and the tests.

    Four conv-BN-ReLU blocks (3→16→32→64→64 channels), the first three halving the resolution,
    then a last conv block whose map Grad-CAM explains, global average pooling, dropout and a
    linear classifier. Only three poolings, so that a 128² input leaves a 16² map: a coarser one
    points Grad-CAM at the wrong lung too often for small lesions.
    """

    gradcam_target_layer = "head"

    def __init__(self, num_classes: int, dropout: float = 0.2) -> None:
        super().__init__()
        widths = (3, 16, 32, 64, 64)
        blocks: list[nn.Module] = []
        for index, (cin, cout) in enumerate(pairwise(widths)):
            blocks.append(_conv_block(cin, cout))
            if index < 3:
                blocks.append(nn.MaxPool2d(2))
        self.features = nn.Sequential(*blocks)
        self.head = _conv_block(64, 64)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.head(self.features(x))
        return self.classifier(self.dropout(torch.flatten(self.pool(x), 1)))


def _conv_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


def _tinycnn(num_classes: int, dropout: float = 0.2) -> nn.Module:
    return TinyCNN(num_classes, dropout=dropout)


ARCHITECTURES: dict[str, Builder] = {
    "tinycnn": _tinycnn,
    **ZOO,
    "hybrid_resnet50_densenet121": HybridResNetDenseNet,
    "densenet121_transformer": DenseNetTransformer,
    "resnet50_multitask": ResNetMultiTask,
}


def build(name: str, num_classes: int, **options: Any) -> nn.Module:
    """Build an untrained network by its registered name.

    Parameters
    ----------
    name
        A key of `ARCHITECTURES`, e.g. ``"resnet50"``.
    num_classes
        Number of outputs of the classification head.
    **options
        Architecture options from the manifest's ``[options]`` table, e.g. ``dropout``.

    Returns
    -------
    torch.nn.Module
        The network with random weights, in training mode; it may carry a
        ``gradcam_target_layer`` attribute naming the submodule Grad-CAM should explain.

    Raises
    ------
    ModelPackageError
        If the name is unknown, `num_classes` < 1 or an option is not accepted.
    """
    builder = ARCHITECTURES.get(name)
    if builder is None:
        known = ", ".join(sorted(ARCHITECTURES))
        raise ModelPackageError(f"architecture: unknown name {name!r} (known: {known})")
    if num_classes < 1:
        raise ModelPackageError(f"classes: {name} needs at least one class, got {num_classes}")
    _check_option_types(name, builder, options)
    try:
        return builder(num_classes, **options)
    # ValueError: e.g. torch's dropout range; AssertionError: torch's and torchvision's own
    # checks (heads dividing the width, the image size the patch size); RuntimeError: a
    # negative width.
    except (TypeError, ValueError, AssertionError, RuntimeError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ModelPackageError(f"options: not accepted by {name}: {message}") from error


def _check_option_types(name: str, builder: Builder, options: dict[str, Any]) -> None:
    """Refuse an option whose value is not of its default's kind: ``tiny = "maybe"`` would be
    taken for true, ``dropout = "high"`` fail deep inside torch."""
    try:
        parameters = inspect.signature(builder).parameters
    except (TypeError, ValueError):  # a builder without a signature: torch decides
        return
    for key, value in options.items():
        parameter = parameters.get(key)
        if parameter is None or parameter.default is inspect.Parameter.empty:
            continue
        default = parameter.default
        if isinstance(default, bool):
            fits = isinstance(value, bool)
        elif isinstance(default, int | float):
            fits = isinstance(value, int | float) and not isinstance(value, bool)
        else:
            continue
        if not fits:
            kind = "true or false" if isinstance(default, bool) else "a number"
            raise ModelPackageError(f"options: {name} option {key} must be {kind}, not {value!r}")
