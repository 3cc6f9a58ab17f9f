"""ResNet-50 ‖ DenseNet-121: two backbones' pooled features fused by a small classifier head."""

from __future__ import annotations

import torch
from torch import nn

from dicomai.models.backbones import (
    densenet_backbone,
    densenet_width,
    resnet_backbone,
    resnet_stage_widths,
)


class HybridResNetDenseNet(nn.Module):
    """The HybridCNN of the model documents.

    ResNet-50 (fc → Identity, 2048 features) and DenseNet-121 (classifier → Identity, 1024)
    see the same image; their pooled features are concatenated (3072) and classified by
    Linear(3072, 1024) → ReLU → Dropout → Linear(1024, C).

    Parameters
    ----------
    num_classes
        Outputs of the head.
    dropout
        Dropout of the head (0.5 in the documents).
    project_512
        Project each backbone's features to 512 (Linear + ReLU) before the concatenation, so
        that the wider ResNet does not dominate the fused vector by its size alone.
    attention_gate
        Weigh the two (projected or raw) feature vectors by a learned per-image softmax gate
        over the backbones; the gate needs equal widths, so it implies ``project_512``.
    tiny
        Small backbones (`dicomai.models.backbones`) for tests and demos.

    Grad-CAM explains the ResNet's ``layer4`` (``resnet.layer4``): the stronger of the two
    backbones on ImageNet, and with `attention_gate` the one the gate can be read against.
    ``gradcam_target_layer`` may be set to ``"densenet.features"`` to explain the other.
    """

    def __init__(
        self,
        num_classes: int,
        dropout: float = 0.5,
        project_512: bool = False,
        attention_gate: bool = False,
        tiny: bool = False,
    ) -> None:
        super().__init__()
        self.resnet = resnet_backbone(tiny)
        resnet_width = resnet_stage_widths(self.resnet)[-1]
        self.resnet.fc = nn.Identity()
        self.densenet = densenet_backbone(tiny)
        dense_width = densenet_width(self.densenet)
        self.densenet.classifier = nn.Identity()
        project = project_512 or attention_gate
        width = 512 if project else None
        self.project = nn.ModuleList(
            [_projection(resnet_width, width), _projection(dense_width, width)]
        )
        fused_each = (width, width) if width else (resnet_width, dense_width)
        self.gate = nn.Linear(sum(fused_each), 2) if attention_gate else None
        hidden = 1024 if not tiny else 128
        self.head = nn.Sequential(
            nn.Linear(sum(fused_each), hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )
        self.gradcam_target_layer = "resnet.layer4"
        # New on pretrained backbones, so trained by the "frozen" strategy and the first stage
        # of "two-stage" too (the projections and the gate stayed at their random values).
        self.head_modules = ("project", "head") + (("gate",) if attention_gate else ())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self._features(x)
        if self.gate is not None:
            weights = torch.softmax(self.gate(torch.cat(features, dim=1)), dim=1)
            features = [f * weights[:, i : i + 1] for i, f in enumerate(features)]
        return self.head(torch.cat(features, dim=1))

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        backbones = (self.resnet, self.densenet)
        return [p(b(x)) for p, b in zip(self.project, backbones, strict=True)]

    def gate_weights(self, x: torch.Tensor) -> torch.Tensor | None:
        """The per-image weights (N, 2) of (ResNet, DenseNet); None without `attention_gate`."""
        if self.gate is None:
            return None
        return torch.softmax(self.gate(torch.cat(self._features(x), dim=1)), dim=1)


def _projection(width: int, to: int | None) -> nn.Module:
    if to is None:
        return nn.Identity()
    return nn.Sequential(nn.Linear(width, to), nn.ReLU(inplace=True))
