"""Small members of the composite families learn a painted lesion, and Grad-CAM points at it.

The same bars, data, tolerance and pointing rule as `test_families` (whose constants these are),
for the networks the model documents compose from a CNN and something more: the multi-task
ResNet-50 with CBAM and an FPN segmentation decoder, trained on its own loss with the nodules'
masks, and the DenseNet-121 + Transformer. Pointing is measured on the class's heat map by the
architecture's own method (Grad-CAM; LayerCAM for the DenseNet-Transformer), the explanation a
radiologist is shown, never on the multi-task network's segmentation output.
"""

from __future__ import annotations

from typing import Any

import pytest
from test_families import train_and_point

# The multi-task network trains on its own loss with the masks (classification alone: pointing
# 0.37-0.95 by seed and thread count) and dropout 0.1 on its head, like the hybrid in
# test_families (0.5 on the 128-wide tiny head kept it at chance). Seeds 0-3 with one thread
# and seeds 0-1 with two: accuracy 0.99-1.0, pointing 0.92-1.0, Dice 0.74-0.83 (with the tiny
# CBAM's 3x3 spatial kernel: see `ResNetMultiTask`).
# The DenseNet-Transformer, narrow (d_model 64, one layer) and at 1e-3 (at 3e-3 seeds 2 and 3
# stayed at chance), explained by its own method, LayerCAM on the DenseNet map: seeds 0 and 2
# with one thread and seed 0 with two, accuracy 0.84-0.97, pointing 0.90-0.97 (Grad-CAM++
# 0.63-0.93); at 3e-3 seeds 0-1, 0.89-0.98 and 0.95-0.98.
TRANSFORMER = {"tiny": True, "d_model": 64, "heads": 4, "ffn": 128, "layers": 1}
FAMILIES = [
    pytest.param(
        "resnet50_multitask", {"tiny": True, "dropout": 0.1}, 3e-3, 10, True, id="multitask"
    ),
    pytest.param("densenet121_transformer", TRANSFORMER, 1e-3, 20, False, id="transformer"),
]


@pytest.mark.parametrize(("architecture", "options", "lr", "epochs", "segments"), FAMILIES)
def test_small_composite_member_learns_the_lesion_and_points_into_it(
    architecture: str, options: dict[str, Any], lr: float, epochs: int, segments: bool
) -> None:
    metrics, hits = train_and_point(architecture, options, lr, epochs, masks=segments)

    assert metrics["val_accuracy"] >= 0.90, metrics
    if segments:
        # The mask branch learnt too: test_train_multitask's bar for a mask in the right place.
        assert metrics["val_dice"] > 0.3, metrics
    assert hits.mean() >= 0.80, f"{architecture}: pointing game {hits.mean():.2f} of {len(hits)}"
