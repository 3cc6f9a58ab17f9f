"""`dicomai train` on a network that also segments: lesion masks in, a package that finds lesions.

The tiny resnet50_multitask trains on 64² PNG folders with a ``masks/`` tree written here (the
synthetic generator's nodule discs); its package must load, be registered, report a validation
Dice no untrained network reaches, and its predicted mask must cover the painted nodules of
images it never saw. Missing masks fail in one line before training; ``--no-masks`` trains the
classification branch alone. Masks follow the image through rotation and flips exactly.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from daemon import dicomai
from test_train_cli import run

from dicomai.errors import DatasetError
from dicomai.imaging.preprocess import to_model_input
from dicomai.inference.runner import Classifier
from dicomai.models.architectures import build
from dicomai.models.package import load_model
from dicomai.training.augment import Augmentation
from dicomai.training.datasets import load_training_data
from dicomai.training.losses import dice_scores
from dicomai.training.synthetic import SyntheticImages, synthesize

SIZE = 64
# With the ReLU in the classification branch (`head_relu`). With the documents' linear branch
# the tiny network's final val Dice was 0.35 (seed 0 at 6e-3, its masks covering a quarter of
# each lesion), 0.62, 0.41 and 0.0 (seeds 0-2 at 3e-3); with the ReLU 0.74, 0.57, 0.71 (seeds
# 0-2 at 6e-3). The branch is not what this file tests: the masks' way from folders to a
# package is.
MULTITASK = ["--architecture", "resnet50_multitask", "--option", "tiny=true",
             "--option", "head_relu=true", "--size", "64",
             "--normalize", "mid-grey", "--batch-size", "8", "--lr", "6e-3",
             "--warmup-epochs", "0"]  # fmt: skip
# A lesion covers ~1 % of the image: an empty prediction scores 0 and one covering everything
# ~0.02, so a Dice of 0.3 needs masks in the right place, about the lesion's size (a disc
# shifted by its radius still scores ~0.4).
MODEST_DICE = 0.3


def write_folders(
    root: Path, n: int, seed: int, masks: bool = True, split: str = "train"
) -> SyntheticImages:
    """``<split>/<class>/`` PNGs and, with `masks`, the nodules' discs under ``masks/<split>/``.

    Normal images get no mask file but the first, which gets an empty one: both mean no lesion.
    """
    data = synthesize(n, size=SIZE, seed=seed)
    wrote_empty = False
    for i, (image, label, mask) in enumerate(
        zip(data.images, data.labels, data.masks, strict=True)
    ):
        name = Path("nodule" if label else "normal") / f"{i:03d}.png"
        (root / split / name).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / split / name), np.rint(image * 255).astype(np.uint8))
        if masks and (label or not wrote_empty):
            wrote_empty = wrote_empty or not label
            (root / "masks" / split / name).parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(root / "masks" / split / name), mask.astype(np.uint8) * 255)
    return data


def train(data: Path, out: Path, *extra: str) -> tuple[int, str]:
    return run("train", "--data", str(data), "--out", str(out), "--name", "nodule-seg",
               *MULTITASK, *extra)  # fmt: skip


def assert_one_line_error(code: int, output: str, message: str, out: Path) -> None:
    assert code == 2, output
    assert output.startswith("error: ") and message in output, output
    assert output.count("\n") == 1, output
    assert not out.exists(), "nothing may be written before the data are checked"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """160 images, 10 epochs of 16 steps: the faint synthetic nodules take the tiny network
    ~80 steps to find (its val Dice measured 0.8 from epoch 7 on, 0 before epoch 5)."""
    root = tmp_path_factory.mktemp("seg")
    write_folders(root / "data", 160, seed=0)
    code, output = train(root / "data", root / "run", "--epochs", "10", "--monitor", "dice")
    assert code == 0, output
    return root / "run"


def test_the_package_reports_a_dice_no_untrained_network_reaches(
    trained: Path, tmp_path: Path
) -> None:
    manifest = load_model(trained / "package").manifest
    assert manifest.architecture == "resnet50_multitask"
    assert manifest.options == {"tiny": True, "head_relu": True}
    assert manifest.training["loss"]["name"] == "multitask"
    assert manifest.training["loss"]["multitask_alpha"] == 0.7
    assert manifest.training["data"]["masks"] == "masks/ folder"
    with open(trained / "training_log.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 10 and all("val_dice" in row for row in rows)
    best = max(float(row["val_dice"]) for row in rows)
    assert manifest.metrics["val_dice"] == pytest.approx(best, abs=1e-6)
    assert manifest.metrics["val_dice"] > MODEST_DICE, manifest.metrics
    images = synthesize(32, size=SIZE, seed=5)
    torch.manual_seed(0)
    untrained = build("resnet50_multitask", 2, tiny=True).eval()
    inputs = torch.from_numpy(np.stack([to_model_input(i, manifest.input) for i in images.images]))
    with torch.no_grad():
        _, mask_logits = untrained.forward_multitask(inputs)
    before = float(np.nanmean(dice_scores(mask_logits, torch.from_numpy(images.masks)).numpy()))
    assert before < manifest.metrics["val_dice"] - 0.2, before


def test_the_trained_package_is_registered_and_its_mask_covers_the_lesion(
    trained: Path, tmp_path: Path
) -> None:
    config = tmp_path / "dicomai.toml"
    config.write_text(f'[storage]\ndir = "{tmp_path / "var"}"\nmin_free_mb = 1\n')
    dicomai(config, "db", "upgrade")
    registered = dicomai(config, "models", "register", str(trained / "package"))
    assert "registered nodule-seg 1.0.0" in registered.stdout
    loaded = load_model(trained / "package")
    unseen = synthesize(12, size=SIZE, seed=7, positive_fraction=1.0)
    inputs = [(str(i), to_model_input(image, loaded.manifest.input))
              for i, image in enumerate(unseen.images)]  # fmt: skip
    predictions = Classifier(loaded).predict(inputs)
    found = []
    for prediction, lesion in zip(predictions, unseen.masks, strict=True):
        assert prediction.extra_maps is not None
        predicted = prediction.extra_maps["segmentation"] > 0.5
        found.append((predicted & lesion).sum() / lesion.sum())
        assert predicted.sum() < 6 * lesion.sum(), "the mask must stay near the lesion"
    assert np.median(found) > 0.5, found


def test_evaluate_reports_the_lesion_dice_of_a_test_set_with_masks(
    trained: Path, tmp_path: Path
) -> None:
    data = write_folders(tmp_path / "data", 40, seed=9, split="test")

    code, output = run("evaluate", str(trained / "package"), "--data", str(tmp_path / "data"),
                       "--out", str(tmp_path / "report"))  # fmt: skip

    assert code == 0, output
    assert "lesion Dice" in output, output
    report = json.loads((tmp_path / "report" / "evaluation.json").read_text())
    segmentation = report["segmentation"]
    assert segmentation["n_lesion"] == int(data.labels.sum())
    assert segmentation["dice_mean"] > MODEST_DICE, segmentation
    assert 0.0 <= segmentation["empty_predicted_on_clear"] <= 1.0
    assert "## Lesion segmentation" in (tmp_path / "report" / "report.md").read_text()
    shutil.rmtree(tmp_path / "data" / "masks")
    code, output = run("evaluate", str(trained / "package"), "--data", str(tmp_path / "data"),
                       "--out", str(tmp_path / "no-masks"))  # fmt: skip
    assert code == 0, output
    assert "segmentation" not in json.loads((tmp_path / "no-masks" / "evaluation.json").read_text())


def test_a_positive_image_without_its_mask_fails_in_one_line(tmp_path: Path) -> None:
    data = write_folders(tmp_path / "data", 24, seed=2)
    first = int(np.flatnonzero(data.labels)[0])
    (tmp_path / "data" / "masks" / "train" / "nodule" / f"{first:03d}.png").unlink()
    code, output = train(tmp_path / "data", tmp_path / "out", "--epochs", "1")
    assert_one_line_error(
        code, output, "no lesion mask for 1 image(s) with a finding", tmp_path / "out"
    )
    assert f"nodule/{first:03d}.png" in output


def test_a_multitask_network_without_masks_fails_unless_told_no_masks(tmp_path: Path) -> None:
    write_folders(tmp_path / "data", 24, seed=2, masks=False)
    code, output = train(tmp_path / "data", tmp_path / "out", "--epochs", "1")
    assert_one_line_error(code, output, "has no masks", tmp_path / "out")
    assert "--no-masks" in output
    code, output = train(tmp_path / "data", tmp_path / "out", "--epochs", "1", "--no-masks")
    assert code == 0, output
    manifest = load_model(tmp_path / "out" / "package").manifest
    assert manifest.training["loss"]["name"] == "ce" and "val_dice" not in manifest.metrics


def test_a_labels_csv_names_masks_relative_to_itself(tmp_path: Path) -> None:
    data = synthesize(12, size=SIZE, seed=3)
    rows = [["file", "label", "mask"]]
    for i, (image, label, mask) in enumerate(
        zip(data.images, data.labels, data.masks, strict=True)
    ):
        cv2.imwrite(str(tmp_path / f"{i}.png"), np.rint(image * 255).astype(np.uint8))
        if label:
            cv2.imwrite(str(tmp_path / f"{i}-mask.png"), mask.astype(np.uint8) * 255)
        rows.append([f"{i}.png", "nodule" if label else "normal", f"{i}-mask.png" if label else ""])
    labels = tmp_path / "labels.csv"
    with open(labels, "w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    loaded = load_training_data(tmp_path, labels, val_fraction=0.25)
    for images in (loaded.train, loaded.val):
        for i, path in enumerate(images.paths):
            has_mask = images.mask_file(i) is not None
            assert has_mask == (images.targets[i] == 0), path  # nodule sorts first
    rows[1][2] = "ghost.png"
    with open(labels, "w", newline="") as handle:
        csv.writer(handle).writerows(rows)
    with pytest.raises(DatasetError, match=r"mask 'ghost\.png' not found"):
        load_training_data(tmp_path, labels)


@pytest.mark.parametrize("seed", range(4))
def test_masks_follow_rotation_and_flips_but_not_exposure(seed: int) -> None:
    mask = np.zeros((64, 64), np.uint8)
    mask[10:30, 36:50] = 1
    image = np.where(mask > 0, 0.8, 0.2).astype(np.float32)
    augmentation = Augmentation(rotation_degrees=15.0, hflip=True, brightness=0.1, contrast=0.1)
    moved_image, moved_mask = augmentation.apply_with_mask(image, mask, np.random.default_rng(seed))
    assert np.array_equal(augmentation.apply(image, np.random.default_rng(seed)), moved_image)
    assert moved_mask is not None and set(np.unique(moved_mask)) <= {0, 1}
    bright = moved_image > np.median(moved_image[moved_mask == 0]) + 0.2
    # Only the pixels on the square's edge, interpolated in the image, may disagree.
    assert (bright != (moved_mask > 0)).mean() < 0.02
    # Scale jitter of ±5 % changes the area by up to ~10 %.
    assert int(moved_mask.sum()) == pytest.approx(int(mask.sum()), rel=0.2)
