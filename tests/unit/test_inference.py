"""Running packages: calibrated scores, heat maps, batching, and the committed demo model."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from daemon import dicomai

from dicomai.errors import ConfigError, ModelPackageError
from dicomai.explain import gradcam
from dicomai.imaging.preprocess import to_model_input
from dicomai.imaging.spec import InputSpec
from dicomai.inference.device import resolve_device
from dicomai.inference.precision import autocast_dtype
from dicomai.inference.runner import Classifier
from dicomai.inference.types import Code
from dicomai.models.architectures import build
from dicomai.models.package import (
    ClassSpec,
    LoadedModel,
    Manifest,
    load_model,
    smoke_test,
    verify_weights,
    write_package,
)
from dicomai.training.synthetic import synthesize

DEMO = Path(__file__).resolve().parents[2] / "models" / "demo-chest-nodule"
SPEC = InputSpec(size=(40, 48))
CLASSES = (
    ClassSpec("normal", Code("17621005", "SCT", "Normal"), 0.5, False),
    ClassSpec("nodule", Code("27925004", "SCT", "Nodule"), 0.5, True),
    ClassSpec("mass", Code("4147007", "SCT", "Mass"), 0.3, True),
)


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    folder = tmp_path_factory.mktemp("package")
    torch.manual_seed(0)
    manifest = Manifest(
        name="three",
        version="0.1.0",
        architecture="tinycnn",
        classes=CLASSES,
        input=SPEC,
        temperature=2.0,
    )
    write_package(folder, manifest, build("tinycnn", 3).state_dict())
    return load_model(folder)


def untrained(folder: Path, architecture: str, options: dict[str, object]) -> LoadedModel:
    """A package of a freshly built network (seed 0) for CLASSES at 64², loaded back."""
    torch.manual_seed(0)
    manifest = Manifest(
        name=architecture.replace("_", "-"),
        version="0.1.0",
        architecture=architecture,
        options=options,
        classes=CLASSES,
        input=InputSpec(size=(64, 64)),
    )
    write_package(folder, manifest, build(architecture, len(CLASSES), **options).state_dict())
    return load_model(folder)


def inputs(n: int, spec: InputSpec, seed: int = 0) -> list[tuple[str, np.ndarray]]:
    images = synthesize(n, size=64, seed=seed).images
    return [(f"1.2.3.{i}", to_model_input(image, spec)) for i, image in enumerate(images)]


def test_scores_are_tempered_softmax_summing_to_one(loaded: LoadedModel) -> None:
    batch = inputs(3, SPEC)
    predictions = Classifier(loaded).predict(batch)
    with torch.inference_mode():
        logits = loaded.module(torch.from_numpy(np.stack([x for _, x in batch]))).double()
    expected = torch.softmax(logits / 2.0, dim=1).numpy()
    for prediction, row, (uid, _) in zip(predictions, expected, batch, strict=True):
        assert prediction.sop_instance_uid == uid and prediction.evaluated
        probabilities = [score.probability for score in prediction.scores]
        assert sum(probabilities) == pytest.approx(1.0)
        np.testing.assert_allclose(probabilities, row, rtol=1e-5)
        assert prediction.predicted == CLASSES[int(np.argmax(row))].name
        assert prediction.score("mass").threshold == 0.3
        assert prediction.score("mass").code == CLASSES[2].code


def test_the_most_probable_finding_is_explained_at_input_size(loaded: LoadedModel) -> None:
    for prediction in Classifier(loaded).predict(inputs(4, SPEC)):
        top = prediction.top_finding
        assert top is not None and prediction.explained == top.name
        assert prediction.heatmap is not None
        assert prediction.heatmap.shape == SPEC.size and prediction.heatmap.dtype == np.float32
        assert 0.0 <= prediction.heatmap.min() <= prediction.heatmap.max() <= 1.0


def test_a_present_finding_is_explained_before_a_more_probable_absent_one(tmp_path: Path) -> None:
    # The most probable finding was explained even when Absent at its own threshold: the map
    # and overlay showed it while a Present finding went without. Biased so that the nodule
    # (about 0.38, threshold 0.5) outranks the mass (about 0.33, threshold 0.3).
    torch.manual_seed(0)
    network = build("tinycnn", 3)
    head = [m for m in network.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        head.bias += torch.tensor([0.0, 0.5, 0.2])
    manifest = Manifest(
        name="three", version="0.1.0", architecture="tinycnn", classes=CLASSES, input=SPEC,
        temperature=2.0,
    )  # fmt: skip
    write_package(tmp_path, manifest, network.state_dict())
    loaded = load_model(tmp_path)
    batch = inputs(8, SPEC)
    predictions = Classifier(loaded).predict(batch)
    contested = [
        (i, p)
        for i, p in enumerate(predictions)
        if p.score("mass").positive
        and not p.score("nodule").positive
        and p.score("nodule").probability > p.score("mass").probability
    ]
    assert contested, "no image whose Absent nodule outranks its Present mass"
    for i, prediction in contested:
        assert prediction.explained == "mass" and prediction.top_finding is not None
        assert prediction.top_finding.name == "mass"
        expected = gradcam(loaded.module, torch.from_numpy(batch[i][1][None]), [2])[0]
        np.testing.assert_allclose(prediction.heatmap, expected, atol=1e-4)


def test_small_batches_give_the_same_results(loaded: LoadedModel) -> None:
    batch = inputs(5, SPEC)
    whole = Classifier(loaded, batch_size=16).predict(batch)
    pieces = Classifier(loaded, batch_size=2).predict(batch)
    for a, b in zip(whole, pieces, strict=True):
        assert a.explained == b.explained
        np.testing.assert_allclose(
            [s.probability for s in a.scores], [s.probability for s in b.scores], rtol=1e-5
        )
        np.testing.assert_allclose(a.heatmap, b.heatmap, atol=1e-4)


def test_scores_and_heat_maps_come_from_one_forward_pass(loaded: LoadedModel) -> None:
    batch = inputs(6, SPEC, seed=3)
    classifier = Classifier(loaded, batch_size=16)
    calls: list[int] = []
    hook = classifier.module.register_forward_hook(lambda *_: calls.append(1))
    try:
        predictions = classifier.predict(batch)
    finally:
        hook.remove()
    assert len(calls) == 1, f"{len(calls)} forward passes for one batch"
    # The same numbers as scoring first and explaining the chosen class after.
    tensors = torch.from_numpy(np.stack([x for _, x in batch]))
    probabilities = classifier.probabilities(tensors)
    for prediction, row in zip(predictions, probabilities, strict=True):
        np.testing.assert_allclose([s.probability for s in prediction.scores], row, rtol=1e-5)
        findings = {i: p for i, p in enumerate(row) if CLASSES[i].is_finding}
        best = max(findings, key=findings.__getitem__)
        assert prediction.explained == CLASSES[best].name
    explained = [[c.name for c in CLASSES].index(p.explained) for p in predictions]
    expected = gradcam(classifier.module, tensors, explained)
    np.testing.assert_allclose(np.stack([p.heatmap for p in predictions]), expected, atol=1e-5)


@pytest.mark.parametrize("method", ["gradcam++", "eigencam"])
def test_the_heat_maps_are_drawn_by_the_method_the_package_names(
    loaded: LoadedModel, method: str
) -> None:
    manifest = dataclasses.replace(loaded.manifest, explanation=method)
    batch = inputs(4, SPEC, seed=5)
    predictions = Classifier(LoadedModel(manifest, loaded.module)).predict(batch)
    tensors = torch.from_numpy(np.stack([x for _, x in batch]))
    explained = [[c.name for c in CLASSES].index(p.explained) for p in predictions]
    heatmaps = np.stack([p.heatmap for p in predictions])
    np.testing.assert_allclose(
        heatmaps, gradcam(loaded.module, tensors, explained, method), atol=1e-5
    )
    assert not np.allclose(heatmaps, gradcam(loaded.module, tensors, explained), atol=1e-3)


def test_a_method_that_cannot_explain_the_network_is_a_package_error(
    loaded: LoadedModel,
) -> None:
    manifest = dataclasses.replace(loaded.manifest, explanation="relevance")
    with pytest.raises(ModelPackageError, match="relevance cannot explain tinycnn"):
        Classifier(LoadedModel(manifest, loaded.module))
    with pytest.raises(ModelPackageError, match="the heat map failed"):
        smoke_test(LoadedModel(manifest, loaded.module))


def test_an_input_size_the_network_does_not_take_is_a_package_error(tmp_path: Path) -> None:
    # A ViT's weights fix its image size; a hand-edited [input] size must be refused at
    # registration in one line, not with torchvision's assertion.
    vit = untrained(tmp_path, "vit_b_16", {"tiny": True, "image_size": 64})
    manifest = dataclasses.replace(vit.manifest, input=InputSpec(size=(96, 96)))
    with pytest.raises(ModelPackageError, match="does not take a 96x96 input"):
        smoke_test(LoadedModel(manifest, vit.module))


def test_the_densenet_transformer_is_explained_with_layercam(tmp_path: Path) -> None:
    options = {"tiny": True, "d_model": 32, "heads": 2, "ffn": 64, "layers": 1}
    loaded_hybrid = untrained(tmp_path, "densenet121_transformer", options)
    assert Classifier(loaded_hybrid).cam_method == "layercam"
    chosen = dataclasses.replace(loaded_hybrid.manifest, explanation="gradcam")
    assert Classifier(LoadedModel(chosen, loaded_hybrid.module)).cam_method == "gradcam"
    smoke_test(loaded_hybrid)


def test_a_model_without_findings_gives_no_heat_map(loaded: LoadedModel) -> None:
    quiet = tuple(dataclasses.replace(spec, is_finding=False) for spec in CLASSES)
    manifest = dataclasses.replace(loaded.manifest, classes=quiet)
    (prediction,) = Classifier(LoadedModel(manifest, loaded.module)).predict(inputs(1, SPEC))
    assert prediction.explained is None and prediction.heatmap is None
    assert prediction.predicted in {spec.name for spec in CLASSES}


def test_wrong_input_size_and_empty_input(loaded: LoadedModel) -> None:
    classifier = Classifier(loaded)
    assert classifier.predict([]) == []
    with pytest.raises(ValueError, match=r"1.2.3.0: input of shape \(3, 64, 64\)"):
        classifier.predict(inputs(1, InputSpec(size=(64, 64))))


def test_committed_demo_package_loads_and_finds_fresh_nodules() -> None:
    demo = load_model(DEMO)
    verify_weights(DEMO, demo.manifest)
    smoke_test(demo)
    manifest = demo.manifest
    assert manifest.name == "demo-chest-nodule" and "not for diagnosis" in manifest.description
    assert manifest.applies_to.matches("DX", "CHEST", "1.2.840.10008.5.1.4.1.1.1.1")
    assert not manifest.applies_to.matches("CT", "CHEST", "1.2.840.10008.5.1.4.1.1.2")
    # A seed the package never saw: neither its training (0) nor its test set (1).
    fresh = synthesize(200, size=manifest.input.size[0], seed=2024)
    batch = [
        (str(i), to_model_input(image, manifest.input)) for i, image in enumerate(fresh.images)
    ]
    predictions = Classifier(demo).predict(batch)
    flagged = np.array([p.score("nodule").positive for p in predictions])
    accuracy = float((flagged == (fresh.labels == 1)).mean())
    assert accuracy >= 0.90, f"demo accuracy {accuracy:.3f} on fresh synthetic images"
    assert all(p.explained == "nodule" and p.heatmap is not None for p in predictions)
    # Pointing game with its usual tolerance, 15 pixels at 224² (Zhang et al., ECCV 2016), scaled.
    margin = 15.0 * manifest.input.size[0] / 224
    hits = []
    for prediction, centre, radius in zip(predictions, fresh.centres, fresh.radii, strict=True):
        if not np.isnan(centre).any():
            peak = np.unravel_index(np.argmax(prediction.heatmap), manifest.input.size)
            hits.append(np.hypot(peak[0] - centre[0], peak[1] - centre[1]) <= radius + margin)
    assert np.mean(hits) >= 0.80, f"demo pointing game {np.mean(hits):.2f} on {len(hits)} images"


def test_bf16_autocast_gives_the_fp32_decisions_and_heat_maps() -> None:
    demo = load_model(DEMO)
    fresh = synthesize(24, size=demo.manifest.input.size[0], seed=2025)
    batch = [
        (str(i), to_model_input(image, demo.manifest.input)) for i, image in enumerate(fresh.images)
    ]

    fp32 = Classifier(demo, precision="fp32").predict(batch)
    bf16 = Classifier(demo, precision="bf16").predict(batch)

    for full, half in zip(fp32, bf16, strict=True):
        assert half.score("nodule").probability == pytest.approx(
            full.score("nodule").probability, abs=0.03
        )
        assert half.heatmap is not None and full.heatmap is not None
        assert half.heatmap.dtype == np.float32
        # bf16 keeps 8 bits of mantissa: the same map to a few thousandths on average ...
        assert np.corrcoef(half.heatmap.ravel(), full.heatmap.ravel())[0, 1] > 0.99
        assert np.abs(half.heatmap - full.heatmap).mean() < 0.01
        if full.score("nodule").positive:
            # ... with its hot spot where fp32 has it (a negative's diffuse map may have two
            # near-equal maxima far apart).
            peaks = [np.unravel_index(np.argmax(m), m.shape) for m in (half.heatmap, full.heatmap)]
            assert np.hypot(*np.subtract(*peaks)) <= 2
    assert [p.predicted for p in bf16] == [p.predicted for p in fp32]


def test_bf16_autocast_gives_the_fp32_relevance_maps_of_a_vit(tmp_path: Path) -> None:
    vit = untrained(tmp_path, "vit_b_16", {"tiny": True, "image_size": 64})
    batch = inputs(4, vit.manifest.input, seed=4)

    fp32 = Classifier(vit, precision="fp32").predict(batch)
    bf16 = Classifier(vit, precision="bf16").predict(batch)

    assert Classifier(vit).cam_method == "relevance"
    for full, half in zip(fp32, bf16, strict=True):
        assert half.heatmap is not None and full.heatmap is not None
        assert half.heatmap.dtype == np.float32 and half.heatmap.shape == (64, 64)
        assert np.corrcoef(half.heatmap.ravel(), full.heatmap.ravel())[0, 1] > 0.99


def test_bf16_autocast_gives_fp32_extra_maps(tmp_path: Path) -> None:
    loaded_multitask = untrained(tmp_path, "resnet50_multitask", {"tiny": True})

    (prediction,) = Classifier(loaded_multitask, precision="bf16").predict(
        inputs(1, loaded_multitask.manifest.input)
    )

    assert prediction.extra_maps is not None
    segmentation = prediction.extra_maps["segmentation"]
    assert segmentation.dtype == np.float32 and segmentation.shape == (64, 64)
    assert prediction.heatmap is not None and prediction.heatmap.dtype == np.float32


def test_precision_auto_is_fp32_on_a_cpu_and_fp16_needs_cuda(loaded: LoadedModel) -> None:
    cpu = torch.device("cpu")
    assert autocast_dtype("auto", cpu) is None
    assert autocast_dtype("fp32", cpu) is None
    assert autocast_dtype("bf16", cpu) is torch.bfloat16
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        Classifier(loaded, precision="fp16")


def test_a_worker_asked_for_fp16_on_a_cpu_stops_at_start_in_one_line(tmp_path: Path) -> None:
    config = tmp_path / "dicomai.toml"
    config.write_text(
        f'[storage]\ndir = "{tmp_path / "var"}"\nmin_free_mb = 1\n[worker]\nprecision = "fp16"\n'
    )

    dicomai(config, "db", "upgrade")  # a worker refuses an old schema first

    result = dicomai(config, "worker", "--device", "cpu", check=False)

    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == "error: [worker] precision fp16 needs a CUDA device, not cpu"


def test_devices_resolve_to_what_this_machine_has() -> None:
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    assert resolve_device("cpu") == "cpu"
    assert resolve_device("auto") == ("cuda:0" if gpus else "cpu")
    with pytest.raises(ConfigError, match=f"this machine has {gpus} usable CUDA GPUs"):
        resolve_device(f"cuda:{gpus}")
    with pytest.raises(ConfigError, match="use auto, cpu, cuda or cuda:N"):
        resolve_device("gpu9")


def test_a_worker_asked_for_a_gpu_it_lacks_stops_at_start_in_one_line(tmp_path: Path) -> None:
    config = tmp_path / "dicomai.toml"
    config.write_text(f'[storage]\ndir = "{tmp_path / "var"}"\nmin_free_mb = 1\n')
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0

    result = dicomai(config, "worker", "--device", f"cuda:{gpus}", check=False)

    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (
        f"error: device cuda:{gpus}: this machine has {gpus} usable CUDA GPUs"
    )
