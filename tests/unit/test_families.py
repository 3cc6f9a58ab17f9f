"""Small members of the architecture families learn a painted lesion; their heat maps point at it.

Each family's small variant is built by the same builder as its full-size members (``tiny=True``:
the same torchvision class or composite, head and declared CAM layer, narrow and downsampling 8x
so that a 64² image leaves an 8x8 map, the EfficientNet, the DenseNet and the ViT 4x), trained
from scratch by `train_classifier` on synthetic chest-like images with and without a nodule, and
explained as the daemon explains it: by the architecture's own method (Grad-CAM through the
automatic target layer for the CNNs, attention relevance for the ViT).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from dicomai.explain import default_method, gradcam
from dicomai.explain.pointing import pointing_hits
from dicomai.imaging.spec import InputSpec
from dicomai.training.synthetic import synthesize
from dicomai.training.trainer import model_inputs, stratified_split, train_classifier

SIZE = 64
SPEC = InputSpec(size=(SIZE, SIZE), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
IMAGES = 640
# The pointing game's usual tolerance, 15 pixels at 224² (Zhang et al., ECCV 2016), scaled.
MARGIN = 15.0 * SIZE / 224

# The hybrid's head trains with dropout 0.1: the documents' 0.5 on the 128-wide tiny head kept
# the tiny multi-task network, whose head is the same, at chance (59 %) after ten epochs. The
# ResNet, the hybrid and the EfficientNet (residual in every block and 4x, see
# `_tiny_efficientnet`; about 1.8 times the ResNet's time) passed with one and with two threads
# and with seed 1 as well: accuracy 0.94-1.0, pointing 0.90-1.0. The DenseNet (4x, see
# `densenet_backbone`), at 3e-3 for twenty epochs, with seeds 0-3 and one thread and seeds 0-1
# and two: accuracy 0.88-0.98, pointing 0.86-1.0 (seed 1 with one thread fell short, at 0.875
# accuracy; at 1e-2 seed 3 stayed at chance); the hybrid on that DenseNet, seed 0 and two
# threads: 1.0 and 1.0. The ViT (4x convolutional stem, one layer; see `_TINY_VIT`), at 3e-3
# for twenty epochs, seeds 0-3 with one thread and seed 0 with two: accuracy 0.87-1.0,
# relevance pointing 0.94-1.0 but for seed 1 (0.867 and 0.59; Grad-CAM on the same networks
# 0.0-0.95). The DenseNet-Transformer is in `test_families_composite`.
FAMILIES = [
    pytest.param("resnet18", {"tiny": True}, 3e-3, 10, id="resnet"),
    pytest.param("densenet121", {"tiny": True}, 3e-3, 20, id="densenet"),
    pytest.param(
        "hybrid_resnet50_densenet121", {"tiny": True, "dropout": 0.1}, 3e-3, 12, id="hybrid"
    ),
    pytest.param("efficientnet_b0", {"tiny": True}, 3e-3, 12, id="efficientnet"),
    pytest.param("vit_b_16", {"tiny": True, "image_size": SIZE}, 3e-3, 20, id="vit"),
]


@pytest.mark.parametrize(("architecture", "options", "lr", "epochs"), FAMILIES)
def test_small_family_member_learns_the_lesion_and_points_into_it(
    architecture: str, options: dict[str, Any], lr: float, epochs: int
) -> None:
    metrics, hits = train_and_point(architecture, options, lr, epochs)

    assert metrics["val_accuracy"] >= 0.90, metrics
    assert hits.mean() >= 0.80, f"{architecture}: pointing game {hits.mean():.2f} of {len(hits)}"


def train_and_point(
    architecture: str, options: dict[str, Any], lr: float, epochs: int, masks: bool = False
) -> tuple[dict[str, Any], np.ndarray]:
    """Train on the synthetic set (seed 0; with the nodules' masks if `masks`) and play the
    pointing game with the architecture's heat maps of the nodule class on the positive
    validation images."""
    data = synthesize(IMAGES, size=SIZE, seed=0)
    model, metrics = train_classifier(
        architecture,
        data.images,
        data.labels,
        SPEC,
        epochs=epochs,
        lr=lr,
        seed=0,
        options=options,
        masks=data.masks if masks else None,
        log=lambda _: None,
    )
    val = stratified_split(data.labels, 0.2, seed=0).val
    positives = val[data.labels[val] == 1]
    inputs = model_inputs(data.images[positives], SPEC)
    maps = gradcam(model, inputs, [1] * len(positives), default_method(model))
    return metrics, pointing_hits(maps, data.centres[positives], data.radii[positives], MARGIN)


def test_pointing_counts_a_maximum_within_radius_plus_margin_as_a_hit() -> None:
    maps = np.zeros((3, 20, 20), np.float32)
    maps[0, 5, 5] = maps[1, 5, 12] = maps[2, 15, 15] = 1.0
    centres = np.array([[5.0, 8.0], [5.0, 8.0], [5.0, 8.0]])
    radii = np.array([2.0, 2.0, 2.0])
    assert pointing_hits(maps, centres, radii, margin=1.0).tolist() == [True, False, False]
    assert pointing_hits(maps, centres, radii, margin=2.0).tolist() == [True, True, False]
    with pytest.raises(ValueError, match="3 maps for 2 centres"):
        pointing_hits(maps, centres[:2], radii[:2], margin=1.0)
