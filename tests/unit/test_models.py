"""The model package format: manifest round trip, one-line errors, weights checks, architectures."""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import pytest
import torch

from dicomai.errors import ModelPackageError
from dicomai.explain import METHODS
from dicomai.imaging.spec import InputSpec
from dicomai.inference.types import Code
from dicomai.models.architectures import ARCHITECTURES, build
from dicomai.models.manifest import EXPLANATION_METHODS
from dicomai.models.package import (
    AppliesTo,
    ClassSpec,
    Manifest,
    load_model,
    read_manifest,
    smoke_test,
    verify_weights,
    write_package,
)

CLASSES = (
    ClassSpec("normal", Code("17621005", "SCT", "Normal"), 0.5, False),
    ClassSpec("nodule", Code("27925004", "SCT", "Nodule"), 0.4, True),
)


def manifest(**changes: object) -> Manifest:
    base = Manifest(
        name="test-model",
        version="2.1.0",
        architecture="tinycnn",
        classes=CLASSES,
        options={"dropout": 0.1},
        description='A "quoted" description\nwith a second line and a tab\t, ünïcödé',
        input=InputSpec(size=(48, 64), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)),
        temperature=1.7,
        applies_to=AppliesTo(modalities=("CR", "DX"), body_parts=("CHEST",)),
        training={"images": 10, "source": "synthetic", "split": {"val": 0.2, "seed": 3}},
        metrics={"val_accuracy": 0.95, "val_recall": [1.0, 0.9], "auc": float("inf")},
    )
    return dataclasses.replace(base, **changes)


@pytest.fixture
def package(tmp_path: Path) -> Path:
    folder = tmp_path / "package"
    write_package(folder, manifest(), build("tinycnn", 2, dropout=0.1).state_dict())
    return folder


def rewrite(folder: Path, old: str, new: str) -> None:
    path = folder / "model.toml"
    text = path.read_text()
    assert old in text, f"{old!r} not in model.toml"
    path.write_text(text.replace(old, new, 1))


def test_written_manifest_reads_back_equal(package: Path) -> None:
    written = read_manifest(package)
    expected = dataclasses.replace(manifest(), weights_sha256=written.weights_sha256)
    assert written == expected
    assert len(written.weights_sha256) == 64
    assert Manifest.from_toml(package / "model.toml").to_toml() == written.to_toml()


def test_an_explanation_method_is_written_only_when_the_package_names_one(
    tmp_path: Path,
) -> None:
    assert "explanation" not in manifest().to_toml()
    chosen = manifest(explanation="gradcam++")
    write_package(tmp_path, chosen, build("tinycnn", 2, dropout=0.1).state_dict())
    assert 'explanation = "gradcam++"' in (tmp_path / "model.toml").read_text()
    assert read_manifest(tmp_path).explanation == "gradcam++"
    # The manifest checks names without importing torch; both lists must stay the same.
    assert tuple(METHODS) == EXPLANATION_METHODS


def test_written_package_loads_in_eval_mode_and_passes_smoke_test(package: Path) -> None:
    loaded = load_model(package)
    verify_weights(package, loaded.manifest)
    smoke_test(loaded)
    assert not loaded.module.training
    assert loaded.num_classes == 2


@pytest.mark.parametrize(
    ("old", "new", "field"),
    [
        ('version = "2.1.0"\n', "", "version: missing"),
        ('version = "2.1.0"', 'version = "2.1"', "version: '2.1' is not a semantic version"),
        ('name = "test-model"', 'name = "../evil"', "name:"),
        ("temperature = 1.7", "temperature = 0.0", "temperature: must be positive"),
        ("temperature = 1.7", "temprature = 1.7", "temprature: unknown field"),
        ("threshold = 0.4", "threshold = 1.4", "classes[1].threshold"),
        ("is_finding = true", 'is_finding = "yes"', "classes[1].is_finding"),
        (
            'weights_file = "weights.safetensors"',
            'weights_file = "../weights.safetensors"',
            "weights_file",
        ),
        ("size = [48, 64]", "size = [48]", "size"),
        ('frames = "first"', 'frames = "every"', "frames"),
        ('modalities = ["CR", "DX"]', 'modalities = "CR"', "applies_to.modalities"),
        ('name = "nodule"', 'name = "normal"', "classes: duplicate name 'normal'"),
        ("weights_sha256 = ", "weights_sha = ", "weights_sha: unknown field"),
        (
            "temperature = 1.7",
            'temperature = 1.7\nexplanation = "saliency"',
            "explanation: 'saliency' is not one of gradcam, gradcam++, eigencam",
        ),
        ("temperature = 1.7", "temperature = 1.7\nexplanation = 3", "explanation: must be"),
    ],
)
def test_bad_manifest_is_one_line_naming_the_field(
    package: Path, old: str, new: str, field: str
) -> None:
    rewrite(package, old, new)
    with pytest.raises(ModelPackageError) as raised:
        read_manifest(package)
    message = str(raised.value)
    assert field in message
    assert "\n" not in message


def test_invalid_toml_and_missing_manifest_are_package_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelPackageError, match="not found"):
        read_manifest(tmp_path)
    (tmp_path / "model.toml").write_text("name = \n")
    with pytest.raises(ModelPackageError, match="unreadable TOML"):
        read_manifest(tmp_path)


def test_tampered_weights_fail_the_sha_check(package: Path) -> None:
    weights = package / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelPackageError, match="weights SHA-256 mismatch"):
        verify_weights(package, read_manifest(package))
    with pytest.raises(ModelPackageError, match="weights SHA-256 mismatch"):
        load_model(package)


def test_missing_weights_file_is_reported(package: Path) -> None:
    (package / "weights.safetensors").unlink()
    with pytest.raises(ModelPackageError, match="weights_file: cannot read"):
        load_model(package)


def test_weights_pt_state_dict_is_loaded(package: Path) -> None:
    state = load_model(package).module.state_dict()
    torch.save(state, package / "weights.pt")
    digest = hashlib.sha256((package / "weights.pt").read_bytes()).hexdigest()
    rewrite(package, 'weights_file = "weights.safetensors"', 'weights_file = "weights.pt"')
    rewrite(package, read_manifest_sha(package), digest)
    loaded = load_model(package)
    for key, value in state.items():
        assert torch.equal(loaded.module.state_dict()[key], value), key


def read_manifest_sha(folder: Path) -> str:
    for line in (folder / "model.toml").read_text().splitlines():
        if line.startswith("weights_sha256"):
            return line.split('"')[1]
    raise AssertionError("no weights_sha256 line")


def test_weights_for_another_architecture_do_not_load(tmp_path: Path) -> None:
    folder = tmp_path / "wrong"
    write_package(folder, manifest(), build("tinycnn", 3).state_dict())
    with pytest.raises(ModelPackageError, match="weights do not fit tinycnn: classifier"):
        load_model(folder)


def test_unknown_architecture_lists_the_known_ones() -> None:
    with pytest.raises(ModelPackageError, match=r"unknown name 'vgg99'.*resnet50"):
        build("vgg99", 2)
    with pytest.raises(ModelPackageError, match="options: not accepted by tinycnn"):
        build("tinycnn", 2, colour=True)


def test_smoke_test_rejects_non_finite_outputs(package: Path) -> None:
    loaded = load_model(package)
    with torch.no_grad():
        loaded.module.classifier.bias.fill_(float("nan"))
    with pytest.raises(ModelPackageError, match="not finite"):
        smoke_test(loaded)


# Small inputs keep the big networks fast; they still exercise every layer and the new head.
@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_every_architecture_builds_with_the_requested_head(name: str) -> None:
    model = build(name, 3).eval()
    batch = 2 if name in ("tinycnn", "resnet18") else 1
    size = 224 if name.startswith("vit") else 64  # a ViT's patch grid is fixed when built
    with torch.inference_mode():
        out = model(torch.randn(batch, 3, size, size))
    assert out.shape == (batch, 3)
    assert model.get_submodule(model.gradcam_target_layer) is not None


def test_applies_to_matches_case_insensitively_and_empty_means_any() -> None:
    rule = AppliesTo(modalities=("CR", "DX"), body_parts=("CHEST",))
    assert rule.matches("dx", "Chest", "1.2.3")
    assert not rule.matches("CT", "CHEST", "1.2.3")
    assert not rule.matches("DX", None, "1.2.3")
    assert AppliesTo().matches(None, None, None)
