"""Heat maps for a batch: the Grad-CAM family (pytorch-grad-cam) and attention relevance.

The Grad-CAM family explains any network with a spatial map or a token grid; relevance
(`dicomai.explain.relevance`) explains networks whose class token attends to patch tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch
from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus, LayerCAM
from pytorch_grad_cam.base_cam import BaseCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from dicomai.explain.relevance import attention_relevance
from dicomai.explain.target import find_target_layer

_CAM_CLASSES: dict[str, type[BaseCAM]] = {
    "gradcam": GradCAM,
    "gradcam++": GradCAMPlusPlus,
    "eigencam": EigenCAM,
    # Each position's activations weighed by its own positive gradients (Jiang et al., IEEE
    # TIP 2021), not by their average over the map: for heads that do not pool evenly.
    "layercam": LayerCAM,
}
RELEVANCE = "relevance"
METHODS: tuple[str, ...] = (*_CAM_CLASSES, RELEVANCE)


def methods_for(model: nn.Module) -> tuple[str, ...]:
    """The methods that can explain `model`: the Grad-CAM family always, relevance where the
    network has attention layers."""
    attends = any(isinstance(module, nn.MultiheadAttention) for module in model.modules())
    return METHODS if attends else tuple(_CAM_CLASSES)


def default_method(model: nn.Module) -> str:
    """The method that draws `model`'s heat maps unless its package names one.

    A network names its own with an ``explanation_method`` attribute (as it names its layer
    with ``gradcam_target_layer``); otherwise Grad-CAM.
    """
    method = str(getattr(model, "explanation_method", "gradcam"))
    if method not in methods_for(model):
        raise ValueError(
            f"explanation_method {method!r} is not one of {', '.join(methods_for(model))}"
        )
    return method


def gradcam(
    model: nn.Module,
    batch: torch.Tensor,
    class_indices: list[int],
    method: str = "gradcam",
    *,
    target_layer: nn.Module | None = None,
    frozen: bool = True,
) -> np.ndarray:
    """Explain one class per image with a class activation map.

    Parameters
    ----------
    model
        The classifier; it is run in eval mode and left in the mode it came in.
    batch
        Model inputs, (N, 3, H, W), on the model's device.
    class_indices
        For each image, the output index to explain (ignored by ``"eigencam"``).
    method
        ``"gradcam"``, ``"gradcam++"``, ``"layercam"``, ``"eigencam"``, or ``"relevance"``
        for a network with attention over a class token and a patch grid
        (`dicomai.explain.relevance`, which ignores `target_layer` and `frozen`).
    target_layer
        The layer to explain; by default `find_target_layer` chooses it.
    frozen
        Stop the backward pass at the target layer by switching the other parameters'
        gradients off (restored afterwards). Grad-CAM needs gradients of activations only,
        so the map is the same as with a full backward, two to three times faster on a
        ResNet-50 (224², 2 cores: 104-130 ms against 208-213 ms here, 72-85 against 215-227
        in FACTS.md). False runs the full backward, for checking that claim.

    Returns
    -------
    numpy.ndarray
        float32 (N, H, W) in [0, 1] at the input resolution, each map scaled to its own maximum.

    Raises
    ------
    ValueError
        On an unknown method, or class indices that do not match the batch or the outputs.
    """
    if len(class_indices) != batch.shape[0]:
        raise ValueError(f"{len(class_indices)} class indices for a batch of {batch.shape[0]}")
    targets = [ClassifierOutputTarget(index) for index in class_indices]
    try:
        maps, _ = _cam(model, batch, targets, method, target_layer, frozen)
    except IndexError as error:
        raise ValueError(f"class indices {class_indices} outside the model's outputs") from error
    return maps


def explain_top_finding(
    model: nn.Module,
    batch: torch.Tensor,
    findings: list[int],
    method: str = "gradcam",
    *,
    target_layer: nn.Module | None = None,
    frozen: bool = True,
    choose: Callable[[torch.Tensor], int] | None = None,
) -> tuple[np.ndarray, torch.Tensor]:
    """Explain each image's highest-scoring finding class, and return the logits too.

    One forward pass gives both, where scoring first and explaining the chosen class after
    takes two (FLOP counts in bench/RESULTS.md: 2.35 forwards against about 1.35). The class
    explained is the argmax of the logits over `findings`, which is also the argmax of the
    tempered softmax or sigmoid probabilities: both are increasing in each logit.

    Parameters
    ----------
    model, batch, method, target_layer, frozen
        As for :func:`gradcam`.
    findings
        The output indices that are findings; at least one.
    choose
        Picks the class to explain from an image's logits (detached, 1-D) instead of their
        argmax over `findings`: the caller's decision rule, thresholds included.

    Returns
    -------
    tuple of numpy.ndarray and torch.Tensor
        The maps, as :func:`gradcam` gives them, and the (N, C) logits, detached.

    Raises
    ------
    ValueError
        On an unknown method, no findings, or a finding index outside the outputs.
    """
    if not findings:
        raise ValueError("no finding classes to explain")
    targets = [_TopOf(findings, choose)] * batch.shape[0]
    try:
        return _cam(model, batch, targets, method, target_layer, frozen)
    except IndexError as error:
        raise ValueError(f"finding indices {findings} outside the model's outputs") from error


class _TopOf:
    """The largest of some classes' logits (its gradient is that of the winning class), or
    the class that `choose` picks from an image's logits."""

    def __init__(
        self, indices: list[int], choose: Callable[[torch.Tensor], int] | None = None
    ) -> None:
        self.indices = list(indices)
        self.choose = choose

    def __call__(self, output: torch.Tensor) -> torch.Tensor:
        if self.choose is not None:
            return output[self.choose(output.detach())]
        return output[self.indices].max()


def _cam(
    model: nn.Module,
    batch: torch.Tensor,
    targets: list,
    method: str,
    target_layer: nn.Module | None,
    frozen: bool,
) -> tuple[np.ndarray, torch.Tensor]:
    if method == RELEVANCE:
        maps, logits = attention_relevance(model, batch, targets)
        return _scaled_to_peak(maps), logits
    cam_class = _CAM_CLASSES.get(method)
    if cam_class is None:
        raise ValueError(f"unknown explanation method {method!r} (known: {', '.join(METHODS)})")
    layer = target_layer if target_layer is not None else find_target_layer(model, batch)
    with _explaining(model, layer if frozen else None):
        cam = cam_class(model=model, target_layers=[layer], reshape_transform=_fp32_grid)
        try:
            maps = cam(input_tensor=batch, targets=targets)
            logits = cam.outputs.detach()
        finally:
            # Not `with cam:` - its __exit__ swallows IndexError and prints it.
            cam.activations_and_grads.release()
    return _scaled_to_peak(np.asarray(maps, dtype=np.float32)), logits


def _scaled_to_peak(maps: np.ndarray) -> np.ndarray:
    """Each map divided by its own maximum; pytorch-grad-cam's 1e-7 guard leaves maps of
    weak activations (an untrained EfficientNet-B7's 2x2 map) peaking far below one."""
    maps = np.clip(maps, 0.0, None)
    peaks = maps.reshape(len(maps), -1).max(axis=1)
    scale = np.where(peaks > 0, 1.0 / np.where(peaks > 0, peaks, 1.0), 1.0).astype(np.float32)
    return np.clip(maps * scale[:, None, None], 0.0, 1.0)


def _fp32_grid(activations: torch.Tensor) -> torch.Tensor:
    """`token_grid` in fp32: under bf16 autocast pytorch-grad-cam's numpy step would fail."""
    return token_grid(activations).float()


def token_grid(activations: torch.Tensor) -> torch.Tensor:
    """A target layer's output as a (N, C, rows, cols) map: token sequences become their grid.

    A convolutional map passes unchanged. A Vision Transformer's (N, 1 + rows·cols, C) token
    sequence loses its class token and is laid out on the square patch grid (14x14 at 224²
    for 16-pixel patches), so the Grad-CAM family weighs patches as it weighs pixels.
    """
    if activations.dim() != 3:
        return activations
    count = activations.shape[1]
    side = math.isqrt(count - 1)
    if side * side == count - 1:
        activations = activations[:, 1:]
    else:
        side = math.isqrt(count)
        if side * side != count:
            raise ValueError(f"{count} tokens do not form a square grid, with or without one")
    return activations.reshape(len(activations), side, side, -1).permute(0, 3, 1, 2)


@contextmanager
def _explaining(model: nn.Module, trainable: nn.Module | None) -> Iterator[None]:
    """Eval mode, gradients on, and only `trainable`'s parameters requiring grad (all if None)."""
    was_training = model.training
    flags = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    keep = {id(p) for p in (trainable or model).parameters()}
    if not keep:
        # A target without parameters would leave its output without a graph to hook.
        keep = {id(p) for p in model.parameters()}
    try:
        for parameter, _ in flags:
            parameter.requires_grad_(id(parameter) in keep)
        model.eval()
        with torch.enable_grad():
            yield
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)
            parameter.grad = None
        model.train(was_training)
