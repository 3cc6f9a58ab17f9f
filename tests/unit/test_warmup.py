"""A classifier warms its model up once when it is built, and leaves the model as it was."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from dicomai.imaging.spec import InputSpec
from dicomai.inference.runner import Classifier
from dicomai.inference.types import Code
from dicomai.models.architectures import build
from dicomai.models.package import (
    ClassSpec,
    LoadedModel,
    Manifest,
    UncertaintySpec,
    load_model,
    write_package,
)

SPEC = InputSpec(size=(40, 48))
CLASSES = (
    ClassSpec("normal", Code("17621005", "SCT", "Normal"), 0.5, False),
    ClassSpec("nodule", Code("27925004", "SCT", "Nodule"), 0.5, True),
)
# One deterministic pass explained from its own gradients, and MC dropout's passes followed
# by a separate Grad-CAM pass: the two paths `predict` takes.
METHODS = ["none", "mc_dropout"]


def package(folder: Path, method: str) -> LoadedModel:
    """A tinycnn package (BatchNorm and dropout layers), seed 0, loaded back from disk."""
    torch.manual_seed(0)
    manifest = Manifest(
        name="warm",
        version="0.1.0",
        architecture="tinycnn",
        classes=CLASSES,
        input=SPEC,
        uncertainty=UncertaintySpec(method=method, passes=3, seed=7),
    )
    write_package(folder, manifest, build("tinycnn", len(CLASSES)).state_dict())
    return load_model(folder)


class Calls:
    """Counts a network's forward calls, and those made with gradients (a heat-map pass)."""

    def __init__(self, module: nn.Module) -> None:
        self.total = 0
        self.with_gradients = 0
        module.register_forward_hook(self._seen)

    def _seen(self, *_: object) -> None:
        self.total += 1
        self.with_gradients += torch.is_grad_enabled()


@pytest.mark.parametrize("method", METHODS)
def test_building_a_classifier_runs_one_warm_up_pass_and_logs_its_duration(
    tmp_path: Path, method: str, caplog: pytest.LogCaptureFixture
) -> None:
    loaded = package(tmp_path, method)
    calls = Calls(loaded.module)

    with caplog.at_level(logging.INFO, logger="dicomai.inference.runner"):
        classifier = Classifier(loaded, device="cpu", batch_size=4)
    at_build = (calls.total, calls.with_gradients)
    calls.total = calls.with_gradients = 0
    zeros = np.zeros((3, *SPEC.size), dtype=np.float32)
    classifier.predict([("1.2.3", zeros)])

    assert at_build == (calls.total, calls.with_gradients), (
        f"building ran {at_build} forward calls (all, with gradients); one image's "
        f"classification and heat map takes {(calls.total, calls.with_gradients)}"
    )
    assert calls.with_gradients > 0, "the warm-up did not run the heat-map pass"
    warmed = [r.getMessage() for r in caplog.records if "warmed up" in r.getMessage()]
    assert len(warmed) == 1, f"expected one warm-up log line, got {warmed}"
    assert "warm 0.1.0 warmed up on cpu with 1 image(s) in " in warmed[0]


@pytest.mark.parametrize("method", METHODS)
def test_warm_up_leaves_weights_statistics_gradients_and_outputs_as_they_were(
    tmp_path: Path, method: str
) -> None:
    loaded = package(tmp_path, method)
    module = loaded.module
    before = {name: tensor.clone() for name, tensor in module.state_dict().items()}
    flags = [parameter.requires_grad for parameter in module.parameters()]
    batch = torch.rand(3, 3, *SPEC.size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        logits = module(batch)
    rng = torch.get_rng_state()

    Classifier(loaded, device="cpu", batch_size=4)

    after = module.state_dict()
    changed = [name for name, tensor in before.items() if not torch.equal(tensor, after[name])]
    assert changed == [], f"the warm-up changed {changed} (BatchNorm statistics?)"
    assert not module.training, "the warm-up left the network in training mode"
    assert all(parameter.grad is None for parameter in module.parameters()), "grads left"
    assert [parameter.requires_grad for parameter in module.parameters()] == flags
    assert torch.equal(torch.get_rng_state(), rng), "the warm-up moved the global RNG"
    with torch.inference_mode():
        torch.testing.assert_close(module(batch), logits)
