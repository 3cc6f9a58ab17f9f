"""Feature extractors the composite networks share: ResNet-50, DenseNet-121 and small variants.

The small (``tiny``) variants keep torchvision's module names, so that the composite networks,
Grad-CAM paths and `load_initial_weights` treat both sizes alike, but they are narrow and
downsample less: the ResNet 8x instead of 32x (a 64² test image leaves an 8x8 map, as tinycnn's
does), the DenseNet 4x (see `densenet_backbone`).

They downsample by pooling, never by a strided convolution. A 3x3 stride-2 convolution on an
even-sized map centres its output half an input pixel up and left of the cell it stands for;
over a ResNet's two strided stages that is 3 pixels at 64², nearly half a cell of the 8x8 map,
which Grad-CAM's upsampling draws at the cell's centre (the strided tiny ResNet's Grad-CAM
maxima sat a cell to one side of the synthetic nodules on many images).
"""

from __future__ import annotations

from torch import nn
from torchvision import models as tv
from torchvision.models.resnet import BasicBlock

# Channels of the small ResNet's four stages.
TINY_RESNET_WIDTHS = (16, 32, 64, 128)


def resnet_backbone(tiny: bool = False) -> tv.ResNet:
    """ResNet-50, or a one-block-per-stage narrow ResNet; ``fc`` is left for the caller."""
    if not tiny:
        return tv.resnet50(weights=None)
    model = tv.ResNet(BasicBlock, [1, 1, 1, 1])
    first = TINY_RESNET_WIDTHS[0]
    model.conv1 = nn.Conv2d(3, first, kernel_size=3, padding=1, bias=False)
    model.bn1 = nn.BatchNorm2d(first)
    model.maxpool = nn.MaxPool2d(2)
    model.inplanes = first
    pooled = (False, True, True, False)
    for index, (width, pool) in enumerate(zip(TINY_RESNET_WIDTHS, pooled, strict=True)):
        stage = model._make_layer(BasicBlock, width, 1)
        if pool:
            stage = nn.Sequential(nn.MaxPool2d(2), *stage)
        setattr(model, f"layer{index + 1}", stage)
    model.fc = nn.Linear(TINY_RESNET_WIDTHS[-1], 1000)
    return model


def resnet_stage_widths(model: tv.ResNet) -> list[int]:
    """Output channels of ``layer1`` … ``layer4``."""
    widths = []
    for name in ("layer1", "layer2", "layer3", "layer4"):
        stage = getattr(model, name)
        block = stage[-1]
        last_bn = block.bn3 if hasattr(block, "bn3") else block.bn2
        widths.append(last_bn.num_features)
    return widths


def densenet_backbone(tiny: bool = False) -> tv.DenseNet:
    """DenseNet-121, or a two-block DenseNet of growth 16 (4x in all: a 16x16 map at 64²).

    The small one's stem is a stride-1 3x3 convolution followed by DenseNet's own max-pool,
    so that, with the average-pooling transition, no strided convolution shifts the map.

    Two blocks, not three at 8x: the last dense block's 3x3 convolutions can carry evidence
    one cell per layer, and on an 8x8 map the three-block network learnt, on some seeds, to
    fire two cells below the nodule (Grad-CAM pointing 0.18 at 0.98 accuracy, the maxima
    16-21 pixels below every nodule). At 4x, seeds 0-3 with one thread and 0-1 with two
    pointed 0.86-1.0.
    """
    if not tiny:
        return tv.densenet121(weights=None)
    model = tv.DenseNet(growth_rate=16, block_config=(2, 2), num_init_features=32, bn_size=2)
    model.features.conv0 = nn.Conv2d(3, 32, kernel_size=3, stride=1, padding=1, bias=False)
    model.features.pool0 = nn.MaxPool2d(2)
    return model


def densenet_width(model: tv.DenseNet) -> int:
    """Channels of the DenseNet's final feature map (``features.norm5``)."""
    norm = model.features.norm5
    assert isinstance(norm, nn.BatchNorm2d)
    return norm.num_features
