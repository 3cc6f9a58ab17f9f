"""The multi-task network and loss, and the extra maps networks hand to the Classifier."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dicomai.errors import ModelPackageError
from dicomai.imaging.preprocess import to_model_input
from dicomai.imaging.spec import InputSpec
from dicomai.inference.runner import Classifier
from dicomai.inference.types import Code
from dicomai.models.architectures import build
from dicomai.models.package import ClassSpec, Manifest, load_model, write_package
from dicomai.training.losses import dice_loss, multitask_loss
from dicomai.training.synthetic import synthesize

SPEC = InputSpec(size=(64, 64), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
CLASSES = (
    ClassSpec("normal", Code("17621005", "SCT", "Normal"), 0.5, False),
    ClassSpec("nodule", Code("27925004", "SCT", "Nodule"), 0.5, True),
)


def test_multitask_loss_weighs_classification_against_dice_and_bce() -> None:
    logits = torch.tensor([[4.0, -4.0], [-4.0, 4.0]])
    targets = torch.tensor([0, 1])
    masks = torch.zeros(2, 8, 8)
    masks[1, 2:5, 2:5] = 1
    perfect = (masks * 20 - 10)[:, None]
    wrong = -perfect
    assert dice_loss(perfect, masks) < 0.01 and dice_loss(wrong, masks) > 0.9
    ce = torch.nn.functional.cross_entropy(logits, targets, label_smoothing=0.1)
    assert multitask_loss(logits, targets, wrong, masks, alpha=1.0) == pytest.approx(float(ce))
    seg_only = multitask_loss(logits, targets, wrong, masks, alpha=0.0)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(wrong, masks[:, None])
    assert seg_only == pytest.approx(0.5 * float(dice_loss(wrong, masks)) + 0.5 * float(bce))
    assert multitask_loss(logits, targets, perfect, masks) < multitask_loss(
        logits, targets, wrong, masks
    )
    with pytest.raises(ValueError, match="alpha"):
        multitask_loss(logits, targets, perfect, masks, alpha=1.5)


def test_full_size_multitask_gives_logits_and_an_input_size_mask() -> None:
    model = build("resnet50_multitask", 4).eval()
    with torch.no_grad():
        logits, masks = model.forward_multitask(torch.randn(1, 3, 96, 64))
        plain = model(torch.randn(1, 3, 96, 64))
    assert logits.shape == plain.shape == (1, 4) and masks.shape == (1, 1, 96, 64)
    assert model.classifier[0].in_features == 2048 and model.classifier[0].out_features == 1024
    assert len(model.attention) == 4


def test_the_classification_branch_is_the_documents_unless_a_relu_is_asked_for(
    tmp_path: Path,
) -> None:
    # Model document 004: GAP -> Linear(2048, 1024) -> Dropout(0.5) -> Linear(1024, C).
    documented = build("resnet50_multitask", 4)
    assert [type(m) for m in documented.classifier] == [
        torch.nn.Linear, torch.nn.Dropout, torch.nn.Linear
    ]  # fmt: skip
    assert documented.classifier[1].p == 0.5 and documented.classifier[2].out_features == 4
    with_relu = build("resnet50_multitask", 2, tiny=True, head_relu=True)
    assert [type(m) for m in with_relu.classifier] == [
        torch.nn.Linear, torch.nn.ReLU, torch.nn.Dropout, torch.nn.Linear
    ]  # fmt: skip
    # A package whose head had the ReLU, its manifest not saying so, does not load as one
    # without it: the layer names differ.
    manifest = Manifest(
        name="relu",
        version="0.1.0",
        architecture="resnet50_multitask",
        classes=CLASSES,
        options={"tiny": True},
        input=SPEC,
    )
    write_package(tmp_path, manifest, with_relu.state_dict())
    with pytest.raises(ModelPackageError, match=r"missing classifier\.2\.weight"):
        load_model(tmp_path)


def test_tiny_multitask_learns_the_lesion_mask_in_a_few_steps() -> None:
    data = synthesize(96, size=64, seed=4, positive_fraction=0.8)
    inputs = torch.from_numpy(np.stack([to_model_input(i, SPEC) for i in data.images]))
    masks = torch.from_numpy(data.masks).float()
    labels = torch.from_numpy(data.labels)
    torch.manual_seed(0)
    model = build("resnet50_multitask", 2, tiny=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(4):
        for batch in torch.randperm(96).split(16):
            logits, mask_logits = model.forward_multitask(inputs[batch])
            loss = multitask_loss(logits, labels[batch], mask_logits, masks[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(float(loss))
    assert np.mean(losses[-6:]) < np.mean(losses[:6]) - 0.05, losses


@pytest.mark.parametrize(
    ("architecture", "options", "key"),
    [
        ("resnet50_multitask", {"tiny": True}, "segmentation"),
        ("densenet121_transformer", {"tiny": True, "d_model": 32, "heads": 2}, "attention"),
    ],
)
def test_classifier_hands_on_the_networks_extra_maps(
    tmp_path: Path, architecture: str, options: dict, key: str
) -> None:
    torch.manual_seed(0)
    manifest = Manifest(
        name="maps",
        version="0.1.0",
        architecture=architecture,
        classes=CLASSES,
        options=options,
        input=SPEC,
    )
    write_package(tmp_path, manifest, build(architecture, 2, **options).state_dict())
    images = synthesize(3, size=64, seed=1).images
    inputs = [(str(i), to_model_input(image, SPEC)) for i, image in enumerate(images)]
    for prediction in Classifier(load_model(tmp_path)).predict(inputs):
        assert prediction.extra_maps is not None and set(prediction.extra_maps) == {key}
        extra = prediction.extra_maps[key]
        assert extra.shape == (64, 64) and extra.dtype == np.float32
        assert 0.0 <= extra.min() <= extra.max() <= 1.0
        assert prediction.heatmap is not None and prediction.heatmap.shape == (64, 64)
