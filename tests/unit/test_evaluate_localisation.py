"""`dicomai evaluate` on images with lesion masks: how often each method's heat map points at them.

The committed demo package (a tinycnn that flags painted nodules) is evaluated on fresh synthetic
images whose nodule discs are written as masks; its Grad-CAM must point into them, and the same
images with every mask mirrored into the other lung must score low, so that the number measures
where the map points and nothing else.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import cv2
import numpy as np
import pytest
from test_train_cli import run

from dicomai.evaluation.localisation import best_method, mask_pointing_hits
from dicomai.training.synthetic import synthesize

DEMO = Path(__file__).resolve().parents[2] / "models" / "demo-chest-nodule"


def write_test_set(root: Path, mirrored_masks: bool = False) -> int:
    """``test/<class>/`` PNGs of 128² and ``masks/test/`` discs; returns the number of nodules."""
    data = synthesize(48, size=128, seed=11)
    for i, (image, label, mask) in enumerate(
        zip(data.images, data.labels, data.masks, strict=True)
    ):
        name = Path("nodule" if label else "normal") / f"{i:03d}.png"
        (root / "test" / name).parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(root / "test" / name), np.rint(image * 255).astype(np.uint8))
        if label:
            disc = mask[:, ::-1] if mirrored_masks else mask
            (root / "masks" / "test" / name).parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(root / "masks" / "test" / name), disc.astype(np.uint8) * 255)
    return int(data.labels.sum())


def evaluate(data: Path, out: Path, package: Path = DEMO) -> dict[str, object]:
    code, output = run("evaluate", str(package), "--data", str(data), "--out", str(out))
    assert code == 0, output
    assert "heat maps (gradcam) on the lesion" in output, output
    report = json.loads((out / "evaluation.json").read_text())
    localisation = report["localisation"]
    assert isinstance(localisation, dict)
    return localisation


def test_evaluate_measures_whether_each_methods_heat_maps_point_at_the_lesions(
    tmp_path: Path,
) -> None:
    nodules = write_test_set(tmp_path / "data")

    found = evaluate(tmp_path / "data", tmp_path / "report")

    assert found["n_lesion"] == nodules
    assert found["method"] == found["best"] == "gradcam"
    assert found["margin_px"] == pytest.approx(15 * 128 / 224, abs=0.01)
    # Relevance explains attention networks; a tinycnn has none.
    assert set(found["pointing"]) == {"gradcam", "gradcam++", "eigencam", "layercam"}
    assert found["pointing"]["gradcam"] >= 0.8, found
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "## Heat maps on the lesion" in markdown and "gradcam (the package's)" in markdown

    write_test_set(tmp_path / "mirrored", mirrored_masks=True)
    elsewhere = evaluate(tmp_path / "mirrored", tmp_path / "mirrored-report")
    assert elsewhere["pointing"]["gradcam"] <= 0.2, elsewhere


def test_a_hit_is_a_maximum_on_the_mask_or_within_the_margin() -> None:
    masks = np.zeros((3, 20, 20), np.uint8)
    masks[:, 8:11, 8:11] = 1
    maps = np.zeros((3, 20, 20), np.float32)
    maps[0, 9, 9] = maps[1, 9, 13] = maps[2, 2, 2] = 1.0
    assert mask_pointing_hits(maps, masks, margin=1.0).tolist() == [True, False, False]
    assert mask_pointing_hits(maps, masks, margin=3.0).tolist() == [True, True, False]
    masks[2] = 0
    with pytest.raises(ValueError, match="mask 2 marks no lesion"):
        mask_pointing_hits(maps, masks, margin=3.0)


def test_the_best_method_must_point_more_often_than_the_packages_own() -> None:
    pointing = {"gradcam": 0.5, "gradcam++": 0.9, "eigencam": 0.9}
    assert best_method(pointing, "eigencam") == "eigencam"
    assert best_method(pointing, "gradcam") == "gradcam++"
    assert best_method({"gradcam": 0.8, "gradcam++": 0.8}, "gradcam") == "gradcam"


def test_evaluate_takes_a_package_archive_as_register_does(tmp_path: Path) -> None:
    archive = tmp_path / "demo.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(DEMO, arcname="demo-chest-nodule")
    write_test_set(tmp_path / "data")
    assert evaluate(tmp_path / "data", tmp_path / "report", archive)["n_lesion"]
