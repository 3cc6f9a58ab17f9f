"""Heat maps: at input size in [0, 1], the frozen-parameter shortcut, target layers, relevance."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from dicomai.explain import find_target_layer, gradcam, methods_for
from dicomai.models.architectures import build


@pytest.fixture(scope="module")
def batch() -> torch.Tensor:
    return torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def seeded(name: str) -> nn.Module:
    torch.manual_seed(0)
    return build(name, 3).eval()


# densenet121 applies an in-place ReLU to its target layer's output: the case most likely
# to make the two backward passes disagree.
@pytest.mark.parametrize("name", ["tinycnn", "resnet18", "densenet121"])
def test_frozen_parameters_give_the_full_backward_map(name: str, batch: torch.Tensor) -> None:
    model = seeded(name)
    frozen = gradcam(model, batch, [0, 1, 2], frozen=True)
    full = gradcam(model, batch, [0, 1, 2], frozen=False)
    assert frozen.max() > 0.5, "the maps are empty, so the comparison proves nothing"
    np.testing.assert_allclose(frozen, full, atol=1e-5)


def test_maps_are_float32_at_input_size_in_unit_range(batch: torch.Tensor) -> None:
    for method in methods_for(seeded("tinycnn")):
        maps = gradcam(seeded("tinycnn"), batch[:, :, :, :48], [0, 1, 2], method=method)
        assert maps.shape == (3, 64, 48), method
        assert maps.dtype == np.float32
        assert maps.min() >= 0.0 and maps.max() <= 1.0


def test_flags_mode_and_gradients_are_restored(batch: torch.Tensor) -> None:
    model = seeded("tinycnn").train()
    model.features[0][0].weight.requires_grad_(False)
    before = [p.requires_grad for p in model.parameters()]
    gradcam(model, batch, [0, 0, 0])
    assert [p.requires_grad for p in model.parameters()] == before
    assert model.training
    assert all(p.grad is None for p in model.parameters())


def test_bad_requests_are_value_errors(batch: torch.Tensor) -> None:
    model = seeded("tinycnn")
    with pytest.raises(ValueError, match="outside the model's outputs"):
        gradcam(model, batch, [0, 1, 7])
    with pytest.raises(ValueError, match="2 class indices for a batch of 3"):
        gradcam(model, batch, [0, 1])
    with pytest.raises(ValueError, match="unknown explanation method 'scorecam'"):
        gradcam(model, batch, [0, 1, 2], method="scorecam")


class SqueezeAtTheEnd(nn.Module):
    """A network whose last Conv2d (in module order) works on a 1x1 map."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Conv2d(3, 8, 3, padding=1)
        self.squeeze = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(8, 8, 1))
        self.fc = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = torch.relu(self.body(x))
        features = features * torch.sigmoid(self.squeeze(features))
        return self.fc(features.mean(dim=(2, 3)))


def test_target_layer_is_declared_or_the_last_spatial_convolution(batch: torch.Tensor) -> None:
    tiny = seeded("tinycnn")
    assert find_target_layer(tiny) is tiny.head
    resnet = seeded("resnet18")
    assert find_target_layer(resnet) is resnet.layer4
    model = SqueezeAtTheEnd().eval()
    assert find_target_layer(model) is model.squeeze[1]
    assert find_target_layer(model, batch) is model.body
    maps = gradcam(model, batch, [0, 1, 0])
    assert maps.shape == (3, 64, 64)


def test_relevance_explains_attention_networks_only_and_leaves_them_as_they_were(
    batch: torch.Tensor,
) -> None:
    assert "relevance" not in methods_for(seeded("tinycnn"))
    with pytest.raises(ValueError, match="TinyCNN has no attention layers"):
        gradcam(seeded("tinycnn"), batch, [0, 1, 2], method="relevance")
    model = seeded("vit_b_16").train()
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    flags = [p.requires_grad for p in model.parameters()]
    with torch.no_grad():
        before = model.eval()(pixels)
    model.train()

    maps = gradcam(model, pixels, [0, 2], method="relevance")

    assert maps.shape == (2, 224, 224) and maps.dtype == np.float32
    assert maps.min() >= 0.0 and maps.max() == pytest.approx(1.0)
    assert model.training and [p.requires_grad for p in model.parameters()] == flags
    assert all(p.grad is None for p in model.parameters())
    attention = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    assert all("forward" not in vars(layer) for layer in attention), "forward left patched"
    with torch.no_grad():
        np.testing.assert_allclose(model.eval()(pixels), before, atol=1e-6)


def test_relevance_runs_the_attention_it_explains_as_torch_does(batch: torch.Tensor) -> None:
    from dicomai.explain.relevance import attention_relevance

    model = seeded("vit_b_16")
    pixels = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        fused = model(pixels)
    _, explicit = attention_relevance(model, pixels, [lambda row: row[0]] * 2)
    np.testing.assert_allclose(explicit, fused, atol=1e-4)


def test_relevance_lays_a_non_square_input_out_on_its_own_grid() -> None:
    torch.manual_seed(0)
    options = {"tiny": True, "d_model": 32, "heads": 2, "ffn": 64, "layers": 1}
    model = build("densenet121_transformer", 2, **options).eval()
    pixels = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(4))
    maps = gradcam(model, pixels, [1, 1], method="relevance")
    assert maps.shape == (2, 64, 96) and np.isfinite(maps).all()


class _LeftHalfHead(nn.Module):
    """Scores what the left half of its map holds: a head that does not pool evenly, as a
    class token's attention does not."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Conv2d(3, 1, 1, bias=False)
        nn.init.constant_(self.features.weight, 1.0 / 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid = self.features(x)
        left = grid[..., : grid.shape[-1] // 2].flatten(1).sum(dim=1, keepdim=True)
        return torch.cat([left, -left], dim=1)


def test_layercam_shows_where_the_head_looks_where_grad_cam_shows_all_it_weighs() -> None:
    # What the score reads: a dim spot on the left; a brighter one on the right counts for
    # nothing. Grad-CAM weighs the whole map by one average gradient, so its maximum is the
    # brighter spot; LayerCAM weighs each position by its own gradient.
    image = torch.zeros(1, 3, 32, 32)
    image[..., 14:18, 4:8] = 1.0
    image[..., 14:18, 24:28] = 2.0
    model = _LeftHalfHead().eval()
    peaks = {}
    for method in ("gradcam", "layercam"):
        heat = gradcam(model, image, [0], method, target_layer=model.features)[0]
        peaks[method] = np.unravel_index(int(heat.argmax()), heat.shape)
    assert 24 <= peaks["gradcam"][1] < 28, peaks
    assert 4 <= peaks["layercam"][1] < 8 and 14 <= peaks["layercam"][0] < 18, peaks
