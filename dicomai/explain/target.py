"""Which layer of a network Grad-CAM explains: declared by the architecture, else discovered."""

from __future__ import annotations

import torch
from torch import nn


def find_target_layer(model: nn.Module, sample: torch.Tensor | None = None) -> nn.Module:
    """Return the layer whose activations Grad-CAM weighs.

    An architecture names its own with a ``gradcam_target_layer`` attribute holding a dotted
    submodule path (a path, not a module, so that the layer is not registered twice in the
    state_dict). Otherwise the last ``nn.Conv2d`` is taken: in execution order and with a
    spatial output (more than one pixel) when `sample` is given, else in module order.

    Parameters
    ----------
    model
        The network.
    sample
        Optional input batch used to skip convolutions on 1x1 maps (squeeze-excitation).

    Returns
    -------
    torch.nn.Module
        The target layer.

    Raises
    ------
    ValueError
        If the declared path does not exist or the network has no usable convolution.
    """
    declared = getattr(model, "gradcam_target_layer", None)
    if declared is not None:
        try:
            return model.get_submodule(str(declared))
        except AttributeError as error:
            raise ValueError(f"gradcam_target_layer {declared!r} is not a submodule") from error
    convolutions = (
        _spatial_convolutions(model, sample)
        if sample is not None
        else [module for module in model.modules() if isinstance(module, nn.Conv2d)]
    )
    if not convolutions:
        raise ValueError("the network has no Conv2d layer with a spatial map to explain")
    return convolutions[-1]


def _spatial_convolutions(model: nn.Module, sample: torch.Tensor) -> list[nn.Module]:
    """The Conv2d layers in the order they run, keeping those whose output is wider than 1x1."""
    seen: list[nn.Module] = []

    def record(module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
        if output.dim() == 4 and output.shape[-1] * output.shape[-2] > 1:
            seen.append(module)

    handles = [
        module.register_forward_hook(record)
        for module in model.modules()
        if isinstance(module, nn.Conv2d)
    ]
    was_training = model.training
    model.eval()  # a probe must not move BatchNorm's running statistics
    try:
        with torch.inference_mode():
            model(sample[:1])
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return seen
