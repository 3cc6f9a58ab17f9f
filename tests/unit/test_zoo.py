"""Every architecture: output, a training step, its three CAMs; options and initial weights."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from dicomai.errors import ModelPackageError
from dicomai.explain import default_method, find_target_layer, gradcam, methods_for
from dicomai.explain.gradcam import token_grid
from dicomai.models.architectures import ARCHITECTURES, build
from dicomai.models.hybrid import HybridResNetDenseNet
from dicomai.models.initial import chexnet_key, load_initial_weights
from dicomai.models.transformer import DenseNetTransformer
from dicomai.training.losses import multitask_loss

# Built and stepped once at batch 1 and explained by Grad-CAM only: the networks whose step
# costs most on 2 cores (the others run batch 2 and all three CAM methods).
HEAVY = {"vit_l_16", "efficientnet_b7", "efficientnet_b6", "resnet152", "resnet101"}


def input_size(name: str) -> int:
    # A ViT's patch grid is fixed when it is built (224² here); the CNNs run at 64² to stay fast.
    return 224 if name.startswith("vit") else 64


def training_loss(model: nn.Module, batch: torch.Tensor, name: str) -> torch.Tensor:
    targets = torch.tensor([0, 2])[: len(batch)]
    if hasattr(model, "forward_multitask"):
        logits, mask_logits = model.forward_multitask(batch)
        masks = torch.zeros(len(batch), *batch.shape[-2:])
        masks[:, 20:30, 20:30] = 1
        return multitask_loss(logits, targets, mask_logits, masks)
    logits = model(batch)
    assert logits.shape == (len(batch), 3), name
    return nn.functional.cross_entropy(logits, targets)


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_every_architecture_trains_a_step_and_is_explained_at_input_size(name: str) -> None:
    torch.manual_seed(0)
    model = build(name, 3, dropout=0.3).train()
    size = input_size(name)
    batch = torch.randn(1 if name in HEAVY else 2, 3, size, size)
    training_loss(model, batch, name).backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    missing = [n for n, p in trainable if p.grad is None]
    assert not missing, f"{name}: no gradient reached {missing[:3]}"
    assert all(torch.isfinite(p.grad).all() for _, p in trainable), f"{name}: gradient not finite"
    torch.optim.SGD(model.parameters(), lr=1e-4).step()
    model.zero_grad(set_to_none=True)
    with torch.inference_mode():
        assert torch.isfinite(model.eval()(batch[:1])).all(), name
    methods = {"gradcam", default_method(model)} if name in HEAVY else methods_for(model)
    for method in sorted(methods):
        maps = gradcam(model, batch[:1], [1], method=method)
        assert maps.shape == (1, size, size), (name, method)
        assert maps.dtype == np.float32 and np.isfinite(maps).all(), (name, method)
        assert maps.min() >= 0.0 and maps.max() <= 1.0, (name, method)
        # An untrained network's evidence for a class may be negative everywhere (an all-zero
        # Grad-CAM); EigenCAM's first component does not depend on the class.
        if method == "eigencam":
            assert maps.max() == pytest.approx(1.0, abs=1e-5), name


ARCHITECTURES_WITH_TINY = {
    "hybrid_resnet50_densenet121",
    "densenet121_transformer",
    "resnet50_multitask",
}


def test_the_declared_cam_layers_give_spatial_maps() -> None:
    expectations = {
        "vit_b_16": "encoder.layers.encoder_layer_11.ln_1",
        "hybrid_resnet50_densenet121": "resnet.layer4",
        "densenet121_transformer": "densenet.features.norm5",
        "resnet50_multitask": "attention.3",
        "efficientnet_b3": "features.8",
        "densenet201": "features.norm5",
        "resnet152": "layer4",
    }
    for name, path in expectations.items():
        model = build(name, 2, **({"tiny": True} if name in ARCHITECTURES_WITH_TINY else {}))
        assert find_target_layer(model) is model.get_submodule(path), name


def test_vit_tokens_become_their_patch_grid() -> None:
    tokens = torch.arange(2 * 197 * 4, dtype=torch.float32).reshape(2, 197, 4)
    grid = token_grid(tokens)
    assert grid.shape == (2, 4, 14, 14)
    # Patch (row 1, column 2) is token 1 + 14 + 2 (token 0 is the class token).
    assert torch.equal(grid[1, :, 1, 2], tokens[1, 17])
    assert token_grid(torch.zeros(1, 16, 3)).shape == (1, 3, 4, 4)
    with pytest.raises(ValueError, match="square grid"):
        token_grid(torch.zeros(1, 7, 3))


def test_hybrid_options_project_and_gate_per_image() -> None:
    batch = torch.randn(3, 3, 64, 64)
    plain = HybridResNetDenseNet(2, tiny=True).eval()
    assert plain.head[0].in_features == 128 + 64 and plain.gate_weights(batch) is None
    projected = HybridResNetDenseNet(2, project_512=True, tiny=True).eval()
    assert projected.head[0].in_features == 1024
    gated = HybridResNetDenseNet(2, attention_gate=True, tiny=True).eval()
    with torch.no_grad():
        weights = gated.gate_weights(batch)
        assert gated(batch).shape == (3, 2)
    assert weights is not None and weights.shape == (3, 2)
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(3))
    full = build("hybrid_resnet50_densenet121", 4)
    assert full.head[0].in_features == 3072 and full.head[-1].out_features == 4
    assert full.head[2].p == 0.5


def test_transformer_attention_over_the_7x7_grid_and_frozen_blocks() -> None:
    torch.manual_seed(0)
    model = DenseNetTransformer(2, layers=2, frozen_blocks=2).eval()
    attention = model.attention_maps(torch.randn(2, 3, 224, 224))
    assert attention.shape == (2, 7, 7)
    assert (attention >= 0).all() and (attention.flatten(1).sum(dim=1) <= 1 + 1e-5).all()
    features = model.densenet.features
    assert not any(p.requires_grad for p in features.denseblock2.parameters())
    assert all(p.requires_grad for p in features.denseblock3.parameters())
    assert all(p.requires_grad for p in model.encoder.parameters())
    with pytest.raises(ModelPackageError, match="frozen_blocks"):
        build("densenet121_transformer", 2, frozen_blocks=5)


def test_unknown_option_names_the_architecture() -> None:
    with pytest.raises(ModelPackageError, match="not accepted by vit_b_16"):
        build("vit_b_16", 2, width=3)


def test_initial_weights_from_a_torchvision_state_dict_skip_the_head(tmp_path: Path) -> None:
    torch.manual_seed(1)
    source = build("resnet18", 1000)
    path = tmp_path / "resnet18-imagenet.pth"
    torch.save(source.state_dict(), path)
    torch.manual_seed(2)
    model = build("resnet18", 3)
    loaded = load_initial_weights(model, path)
    assert "layer4.1.bn2.running_var" in loaded and not any(k.startswith("fc") for k in loaded)
    torch.testing.assert_close(model.conv1.weight, source.conv1.weight)
    assert model.fc.out_features == 3


def test_initial_weights_reach_the_backbones_of_composite_networks(tmp_path: Path) -> None:
    path = tmp_path / "densenet.pth"
    source = build("densenet121_transformer", 2, tiny=True).densenet
    torch.save(source.state_dict(), path)
    hybrid = build("hybrid_resnet50_densenet121", 2, tiny=True)
    loaded = load_initial_weights(hybrid, path)
    assert loaded and all(k.startswith("densenet.features.") for k in loaded)
    torch.testing.assert_close(hybrid.densenet.features.conv0.weight, source.features.conv0.weight)


def test_chexnet_checkpoint_keys_are_renamed_to_torchvision(tmp_path: Path) -> None:
    source = build("densenet121", 14)
    renamed = {}
    for key, value in source.state_dict().items():
        old = key.replace("norm1", "norm.1").replace("conv2", "conv.2")
        old = old.replace("classifier.", "classifier.0.")
        renamed["module.densenet121." + old] = value
    assert "module.densenet121.features.denseblock1.denselayer1.norm.1.weight" in renamed
    path = tmp_path / "chexnet.pth.tar"
    torch.save({"epoch": 10, "state_dict": renamed}, path)
    model = build("densenet121_transformer", 2)
    loaded = load_initial_weights(model, path, kind="chexnet")
    layer = "features.denseblock4.denselayer16.conv2.weight"
    assert f"densenet.{layer}" in loaded
    torch.testing.assert_close(model.densenet.get_parameter(layer), source.get_parameter(layer))
    assert chexnet_key("module.densenet121.features.norm5.bias") == "features.norm5.bias"


def test_missing_or_unfitting_initial_weights_are_package_errors(tmp_path: Path) -> None:
    model = build("tinycnn", 2)
    with pytest.raises(ModelPackageError, match="not found"):
        load_initial_weights(model, tmp_path / "absent.pth")
    path = tmp_path / "other.pth"
    torch.save({"unrelated.weight": torch.zeros(3)}, path)
    with pytest.raises(ModelPackageError, match="no tensor"):
        load_initial_weights(model, path)


def test_weights_that_fit_a_backbone_in_part_are_refused(tmp_path: Path) -> None:
    # A ResNet-18 file in a ResNet-34 loaded 120 of its tensors, left the rest random, silently.
    path = tmp_path / "resnet18.pth"
    torch.save(build("resnet18", 1000).state_dict(), path)
    with pytest.raises(ModelPackageError, match=r"fits only 100 of the 180 tensors of the netw"):
        load_initial_weights(build("resnet34", 2), path)


@pytest.mark.parametrize(
    ("source", "target"), [("resnet34", "resnet18"), ("resnet101", "resnet50")]
)
def test_weights_of_a_larger_network_of_the_family_are_refused(
    tmp_path: Path, source: str, target: str
) -> None:
    # They filled every tensor of the smaller network and were recorded as its start, the
    # deeper stages' tensors left unread.
    path = tmp_path / f"{source}.pth"
    torch.save(build(source, 1000).state_dict(), path)
    with pytest.raises(ModelPackageError, match=r"tensors of .* fit nothing in ResNet"):
        load_initial_weights(build(target, 2), path)


def test_torchvisions_published_densenet_layout_loads_as_torchvision(tmp_path: Path) -> None:
    # Its files keep the pre-0.3 names (denselayer1.norm.1.weight) that torchvision renames as
    # it loads them: 145 of 725 tensors fitted, and the run was refused.
    source = build("densenet121", 1000, tiny=True)
    published = {
        re.sub(r"(denselayer\d+\.(?:norm|relu|conv))(\d)\.", r"\1.\2.", key): value
        for key, value in source.state_dict().items()
        if not key.endswith("num_batches_tracked")  # saved before torch 0.4.1
    }
    assert any(".norm.1." in key for key in published)
    path = tmp_path / "densenet121-a639ec97.pth"
    torch.save(published, path)
    model = build("densenet121", 2, tiny=True)
    loaded = load_initial_weights(model, path)
    layer = "features.denseblock1.denselayer1.norm1.weight"
    assert layer in loaded
    torch.testing.assert_close(model.get_parameter(layer), source.get_parameter(layer))


@pytest.mark.parametrize("options", [{"project_512": True}, {"attention_gate": True}])
def test_a_merged_backbone_file_loads_into_every_hybrid_variant(
    tmp_path: Path, options: dict
) -> None:
    # The variants' own projections and gate, which no pretrained file has, were counted as
    # tensors the file failed to fit.
    source = build("hybrid_resnet50_densenet121", 2, tiny=True)
    merged = {
        key: value
        for key, value in source.state_dict().items()
        if key.startswith(("resnet.", "densenet."))
    }
    path = tmp_path / "merged.pth"
    torch.save(merged, path)
    model = build("hybrid_resnet50_densenet121", 2, tiny=True, **options)
    loaded = load_initial_weights(model, path)
    assert set(loaded) == set(merged)


def test_a_data_parallel_checkpoint_loads_under_either_kind(tmp_path: Path) -> None:
    # "module.features..." (a DenseNet-121 saved inside DataParallel) fitted no tensor.
    source = build("densenet121", 14, tiny=True)
    path = tmp_path / "parallel.pth"
    torch.save({f"module.{k}": v for k, v in source.state_dict().items()}, path)
    for kind in ("torchvision", "chexnet"):
        model = build("densenet121_transformer", 2, tiny=True)
        loaded = load_initial_weights(model, path, kind=kind)  # type: ignore[arg-type]
        assert "densenet.features.norm5.weight" in loaded, kind


@pytest.mark.parametrize(
    ("name", "options", "words"),
    [
        ("densenet121_transformer", {"tiny": True, "heads": 7}, "divisible by num_heads"),
        ("vit_b_16", {"image_size": 100}, "patch size"),
        ("resnet50_multitask", {"tiny": True, "fpn_channels": -3}, "resnet50_multitask"),
    ],
)
def test_options_torch_refuses_are_one_line_errors(name: str, options: dict, words: str) -> None:
    # They came out as an AssertionError's or a RuntimeError's traceback.
    with pytest.raises(ModelPackageError, match=words):
        build(name, 2, **options)


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"attention_kernel": 4}, "attention_kernel must be an odd number"),
        ({"attention_kernel": 0}, "attention_kernel must be an odd number"),
        ({"fpn_channels": 0}, "fpn_channels must be at least 1"),
    ],
)
def test_multitask_options_that_cannot_work_are_refused_at_build(options: dict, words: str) -> None:
    # An even kernel built, then failed every forward pass; 0 silently meant the default.
    with pytest.raises(ModelPackageError, match=words):
        build("resnet50_multitask", 2, tiny=True, **options)


def test_a_transformer_without_layers_is_refused_at_build() -> None:
    # It built, then every inference failed reading the last layer's attention.
    with pytest.raises(ModelPackageError, match="layers must be at least 1"):
        build("densenet121_transformer", 2, tiny=True, layers=0)
