"""The torchvision classifiers (ResNet, DenseNet, EfficientNet, ViT) with our head and CAM layer.

Each builder takes ``num_classes`` and ``dropout`` (a Dropout before the new linear head, the
one MC dropout samples), builds the network with random weights (``weights=None``: nothing is
downloaded) and names the layer Grad-CAM explains in ``gradcam_target_layer``. ``tiny=True``
builds a small member of the same torchvision class instead, for tests and demos: the same head,
the same CAM layer, but narrow and downsampling 8x (the EfficientNet and the DenseNet 4x, see
`_tiny_efficientnet` and `densenet_backbone`), so a 64² image leaves an 8x8 map as tinycnn's
does, where the full networks' 32x would leave 2x2.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn
from torchvision import models as tv
from torchvision.models.efficientnet import MBConvConfig
from torchvision.models.vision_transformer import ConvStemConfig

from dicomai.models.backbones import densenet_backbone, resnet_backbone

Builder = Callable[..., nn.Module]


def _head(in_features: int, num_classes: int, dropout: float) -> nn.Module:
    head = nn.Linear(in_features, num_classes)
    return nn.Sequential(nn.Dropout(dropout), head) if dropout else head


def resnet(factory: Callable[..., tv.ResNet]) -> Builder:
    """A builder for a torchvision ResNet; its CAM layer is ``layer4``, the last residual stage."""

    def build_resnet(num_classes: int, dropout: float = 0.0, tiny: bool = False) -> nn.Module:
        model = resnet_backbone(tiny=True) if tiny else factory(weights=None)
        model.fc = _head(model.fc.in_features, num_classes, dropout)
        model.gradcam_target_layer = "layer4"
        return model

    return build_resnet


def densenet(factory: Callable[..., tv.DenseNet]) -> Builder:
    """A builder for a torchvision DenseNet; its CAM layer is ``features.norm5``, the last one.

    The same map as the whole ``features`` stack gives, but naming the last layer lets
    Grad-CAM's frozen backward stop there instead of running through every dense block.
    """

    def build_densenet(num_classes: int, dropout: float = 0.0, tiny: bool = False) -> nn.Module:
        model = densenet_backbone(tiny=True) if tiny else factory(weights=None)
        model.classifier = _head(model.classifier.in_features, num_classes, dropout)
        model.gradcam_target_layer = "features.norm5"
        return model

    return build_densenet


def efficientnet(factory: Callable[..., tv.EfficientNet], default_dropout: float) -> Builder:
    """A builder for a torchvision EfficientNet, dropout defaulting to the paper's for its size."""

    def build_efficientnet(
        num_classes: int, dropout: float = default_dropout, tiny: bool = False
    ) -> nn.Module:
        model = _tiny_efficientnet(dropout) if tiny else factory(weights=None, dropout=dropout)
        last = model.classifier[-1]
        assert isinstance(last, nn.Linear)
        model.classifier[-1] = nn.Linear(last.in_features, num_classes)
        # Its last Conv2d by module order sits in a squeeze-excitation on a 1x1 map; the
        # feature stack ends in the 1x1 projection block whose output is the 7x7 map, named
        # itself so that Grad-CAM's frozen backward stops there.
        model.gradcam_target_layer = f"features.{len(model.features) - 1}"
        return model

    return build_efficientnet


def vit(factory: Callable[..., tv.VisionTransformer]) -> Builder:
    """A builder for a torchvision ViT; its heat maps are attention relevance by default, and
    the Grad-CAM family explains the last block's first LayerNorm.

    Its output is the token sequence, (N, 1 + 14², C) at 224²; `dicomai.explain.gradcam`
    drops the class token and reshapes the rest to the 14x14 patch grid. ``image_size`` must
    be a multiple of 16 and is fixed at build time (224 by default).
    """

    def build_vit(
        num_classes: int, dropout: float = 0.0, image_size: int = 224, tiny: bool = False
    ) -> nn.Module:
        options: dict[str, Any] = {"image_size": image_size}
        if tiny:
            model = tv.VisionTransformer(**_TINY_VIT, **options)
        else:
            model = factory(weights=None, **options)
        head = model.heads.head
        assert isinstance(head, nn.Linear)
        model.heads.head = _head(head.in_features, num_classes, dropout)
        last = len(model.encoder.layers) - 1
        model.gradcam_target_layer = f"encoder.layers.encoder_layer_{last}.ln_1"
        # The class token reads the patches through attention: on seven small ViTs trained on
        # painted nodules, relevance's maximum fell inside the nodule on 0.34-1.0 of the images
        # (six of them 0.87-1.0), Grad-CAM's on 0.05-0.85 (`dicomai.explain.relevance`).
        model.explanation_method = "relevance"
        return model

    return build_vit


# Four MBConv stages (expand ratio, kernel, stride, in, out, blocks), B0's MBConv1 then three
# MBConv4, all of one width so that every block keeps its residual connection: torchvision's
# MBConv adds one only where input and output match. A B0-like narrowing stack (16-24-40-64,
# kernels 3-3-5-3), residual in its first stage only, learnt the lesion (accuracy 0.89-0.99)
# but put its Grad-CAM maxima a cell or more beside it: pointing 0.0-0.68 at 8x, 0.22-1.0 at
# 4x by seed and thread count.
_TINY_EFFICIENTNET = [MBConvConfig(1, 3, 1, 32, 32, 1)] + [
    MBConvConfig(4, 3, 1, 32, 32, 1) for _ in range(3)
]


def _tiny_efficientnet(dropout: float) -> tv.EfficientNet:
    """The small EfficientNet: 4x, by a max-pool before each of its first two stages.

    Pooling instead of B0's strided stem and depthwise convolutions keeps the map's cells
    centred where Grad-CAM draws them (see `dicomai.models.backbones`). It stops at 4x, a 16x16
    map at 64², where the other small CNNs go to 8x: at 8x an all-MBConv4 version of the stack
    above pointed into 0.86 of the lesions (seed 0), at 4x into 0.95-1.0 (seeds 0-3). No
    stochastic depth: it would drop whole blocks of a four-block net trained for twelve epochs.
    """
    model = tv.EfficientNet(
        _TINY_EFFICIENTNET, dropout=dropout, stochastic_depth_prob=0.0, last_channel=128
    )
    stem = model.features[0][0]
    assert isinstance(stem, nn.Conv2d)
    stem.stride = (1, 1)
    for index in (1, 2):
        model.features[index] = nn.Sequential(nn.MaxPool2d(2), *model.features[index])
    return model


# The small ViT: a convolutional stem of two stride-2 stages (kernel 4, padding 1: each cell
# centred on its 2x2 block, nothing shifts) makes 4-pixel patches, a 16x16 grid at 64², read by
# one encoder layer of width 64. With 8-pixel linear patches and four layers it stayed at chance
# on the painted nodules; the stem gives it the locality a ViT otherwise learns from far more
# images than a test has (Xiao et al., "Early convolutions help transformers see better", 2021).
_TINY_VIT: dict[str, Any] = {
    "patch_size": 4,
    "conv_stem_configs": [ConvStemConfig(16, 4, 2), ConvStemConfig(32, 4, 2)],
    "num_layers": 1,
    "num_heads": 4,
    "hidden_dim": 64,
    "mlp_dim": 128,
}

# EfficientNet's own dropout before the head grows with its scale (Tan & Le, 2019; torchvision).
_EFFICIENTNET_DROPOUT = (0.2, 0.2, 0.3, 0.3, 0.4, 0.4, 0.5, 0.5)

ZOO: dict[str, Builder] = {
    "resnet18": resnet(tv.resnet18),
    "resnet34": resnet(tv.resnet34),
    "resnet50": resnet(tv.resnet50),
    "resnet101": resnet(tv.resnet101),
    "resnet152": resnet(tv.resnet152),
    "densenet121": densenet(tv.densenet121),
    "densenet169": densenet(tv.densenet169),
    "densenet201": densenet(tv.densenet201),
    **{
        f"efficientnet_b{i}": efficientnet(getattr(tv, f"efficientnet_b{i}"), p)
        for i, p in enumerate(_EFFICIENTNET_DROPOUT)
    },
    "vit_b_16": vit(tv.vit_b_16),
    "vit_l_16": vit(tv.vit_l_16),
}
