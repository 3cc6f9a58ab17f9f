"""ResNet-50 with CBAM, classifying an image and segmenting its lesion through an FPN decoder."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from dicomai.models.backbones import resnet_backbone, resnet_stage_widths
from dicomai.models.cbam import CBAM


class ResNetMultiTask(nn.Module):
    """The multi-task model of the model documents.

    A ResNet-50 encoder with a CBAM after each of its four stages. Classification: global
    average pooling → Linear(2048, 1024) → Dropout → Linear(1024, C), as the documents give it
    (`head_relu` puts a ReLU after the first Linear). Segmentation: an
    FPN decoder (1x1 lateral convolutions on the four stages, top-down upsampling and
    addition, a 3x3 smoothing convolution) upsampled to the input size and a 1x1 convolution
    giving one lesion logit per pixel.

    `forward` returns the class logits only, so the network classifies and is explained like
    any other; `forward_multitask` returns logits and mask logits, `forward_with_maps` logits
    and the mask as probabilities. Grad-CAM explains the attention-weighted last stage
    (``attention.3``).

    Parameters
    ----------
    num_classes
        Outputs of the classification head.
    dropout
        Dropout of the classification head.
    fpn_channels
        Width of the decoder (256; 32 with `tiny`).
    tiny
        The small ResNet of `dicomai.models.backbones`, for tests and demos.
    attention_kernel
        Kernel of the CBAM spatial attention: the documents' 7, or 3 with `tiny`. On the tiny
        network's 8x8 maps of stages 3 and 4 a 7x7 kernel reaches into the zero padding from
        every cell. Trained from scratch with the multi-task loss on the synthetic chests (10
        epochs), 2 of 7 such runs learnt a stage-3 gate that lit the image's corners and dimmed
        the lungs, and Grad-CAM then marked the lung base instead of the nodule (pointing 0.02
        and 0.05 at 94-99 % accuracy); a third stayed at chance. With 3x3, all six runs (four
        seeds, one and two threads) pointed into the nodule (0.92-1.0).
    head_relu
        A ReLU between the classification branch's two Linear layers. The documents have none
        (the two then act as one linear map of the pooled features); packages of this network
        made before the option existed had one, and must name it in their ``[options]``. The
        layers' names differ with and without it (``classifier.3`` and ``classifier.2``), so
        weights trained one way never load silently into the other.
    """

    gradcam_target_layer = "attention.3"
    # New on a pretrained encoder, so trained even by the "frozen" strategy: the CBAM blocks,
    # the classification branch and the whole segmentation decoder.
    head_modules = ("attention", "classifier", "lateral", "smooth", "mask_head")

    def __init__(
        self,
        num_classes: int,
        dropout: float = 0.5,
        fpn_channels: int | None = None,
        tiny: bool = False,
        attention_kernel: int | None = None,
        head_relu: bool = False,
    ) -> None:
        super().__init__()
        self.encoder = resnet_backbone(tiny)
        self.encoder.fc = nn.Identity()
        widths = resnet_stage_widths(self.encoder)
        kernel = (3 if tiny else 7) if attention_kernel is None else attention_kernel
        if kernel < 1 or kernel % 2 == 0:
            # An even kernel's padding shifts the map by a cell: the forward pass failed.
            raise ValueError(f"attention_kernel must be an odd number >= 1, got {kernel}")
        self.attention = nn.ModuleList(CBAM(width, kernel_size=kernel) for width in widths)
        hidden = 128 if tiny else 1024
        activation = [nn.ReLU(inplace=True)] if head_relu else []
        self.classifier = nn.Sequential(
            nn.Linear(widths[-1], hidden),
            *activation,
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )
        channels = (32 if tiny else 256) if fpn_channels is None else fpn_channels
        if channels < 1:
            raise ValueError(f"fpn_channels must be at least 1, got {channels}")
        self.lateral = nn.ModuleList(nn.Conv2d(w, channels, kernel_size=1) for w in widths)
        self.smooth = nn.Sequential(
            nn.Conv2d(channels, channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
        )
        self.mask_head = nn.Conv2d(channels, 1, kernel_size=1)

    def _stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        encoder = self.encoder
        x = encoder.maxpool(encoder.relu(encoder.bn1(encoder.conv1(x))))
        stages = []
        for stage, attention in zip(
            (encoder.layer1, encoder.layer2, encoder.layer3, encoder.layer4),
            self.attention,
            strict=True,
        ):
            x = attention(stage(x))
            stages.append(x)
        return stages

    def _classify(self, last: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(F.adaptive_avg_pool2d(last, 1), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._classify(self._stages(x)[-1])

    def forward_multitask(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Class logits (N, C) and lesion mask logits (N, 1, H, W) at the input size."""
        stages = self._stages(x)
        merged = self.lateral[-1](stages[-1])
        for stage, lateral in zip(reversed(stages[:-1]), list(self.lateral)[-2::-1], strict=True):
            merged = lateral(stage) + F.interpolate(merged, size=stage.shape[-2:], mode="nearest")
        decoded = F.interpolate(
            self.smooth(merged), size=x.shape[-2:], mode="bilinear", align_corners=False
        )
        return self._classify(stages[-1]), self.mask_head(decoded)

    def forward_with_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Class logits and ``{"segmentation": lesion probability (N, H, W) in [0, 1]}``."""
        logits, mask_logits = self.forward_multitask(x)
        return logits, {"segmentation": torch.sigmoid(mask_logits[:, 0])}
