"""`dicomai train` and `dicomai evaluate` as users run them, on synthetic images written here.

Every strategy trains tinycnn for two epochs on 64² PNG folders and must give a package that
`dicomai models register` accepts and the daemon's Classifier runs on a DICOM image; the DICOM +
CSV layouts (single- and multi-label) do the same; a resumed run ends with the weights of an
uninterrupted one; bad layouts fail in one line before training.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from click.testing import CliRunner
from daemon import dicomai
from sklearn import metrics as skm

from dicomai.cli import main as cli_main
from dicomai.cli import training as training_cli
from dicomai.errors import DatasetError
from dicomai.imaging.preprocess import prepare
from dicomai.imaging.spec import InputSpec
from dicomai.inference.runner import Classifier
from dicomai.models.package import load_model
from dicomai.training.fit import FitSettings
from dicomai.training.runs import RunSettings, train_package
from dicomai.training.synthetic import synthesize, write_dicom_images

SIZE = 64
FAST = ["--size", "64", "--normalize", "mid-grey", "--epochs", "2", "--batch-size", "16",
        "--lr", "3e-3", "--head-lr", "3e-3", "--warmup-epochs", "0"]  # fmt: skip
STRATEGIES = {
    "full": [],
    "frozen": [],
    "two-stage": ["--freeze-epochs", "1"],
    "lld": ["--layer-decay", "0.5"],
    "gradual": ["--unfreeze-at", "1"],
}


def write_png_folders(root: Path, n_train: int = 64, n_test: int = 24) -> Path:
    for split, n, seed in (("train", n_train, 0), ("test", n_test, 1)):
        data = synthesize(n, size=SIZE, seed=seed)
        for i, (image, label) in enumerate(zip(data.images, data.labels, strict=True)):
            path = root / split / ("nodule" if label else "normal") / f"{split}-{i:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(path), np.rint(image * 255).astype(np.uint8))
    return root


def run(*args: str) -> tuple[int, str]:
    """The `dicomai` command in this process (torch is imported once for the whole module)."""
    training_cli.register(cli_main.cli)
    result = CliRunner().invoke(cli_main.cli, list(args))
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def assert_daemon_runs(package: Path, dicom: Path) -> None:
    loaded = load_model(package)
    ds = pydicom.dcmread(dicom)
    _, model_input = prepare(ds, loaded.manifest.input)
    (prediction,) = Classifier(loaded).predict([(ds.SOPInstanceUID, model_input)])
    assert [s.name for s in prediction.scores] == list(loaded.manifest.class_names)
    assert all(0.0 <= s.probability <= 1.0 for s in prediction.scores)
    assert prediction.heatmap is not None and prediction.heatmap.shape == (SIZE, SIZE)


@pytest.fixture(scope="module")
def pngs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_png_folders(tmp_path_factory.mktemp("pngs"))


@pytest.fixture(scope="module")
def dicom_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    (written,) = write_dicom_images(tmp_path_factory.mktemp("dcm"), 1, seed=9, size=128)
    return written.path


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A config with its own storage folder and an upgraded SQLite database."""
    root = tmp_path_factory.mktemp("site")
    config = root / "dicomai.toml"
    config.write_text(f'[storage]\ndir = "{root / "var"}"\nmin_free_mb = 1\n')
    dicomai(config, "db", "upgrade")
    return config


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_each_strategy_gives_a_package_the_daemon_runs(
    strategy: str, pngs: Path, dicom_image: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    name = f"nodule-{strategy}"
    code, output = run("train", "--data", str(pngs), "--out", str(out), "--name", name,
                       "--strategy", strategy, *FAST, *STRATEGIES[strategy])  # fmt: skip
    assert code == 0, output
    manifest = load_model(out / "package").manifest
    assert manifest.class_names == ("nodule", "normal")
    assert [c.is_finding for c in manifest.classes] == [True, False]
    assert manifest.classes[1].code.meaning == "Normal"
    assert manifest.training["strategy"]["strategy"] == strategy
    assert manifest.training["data"]["n_train"] + manifest.training["data"]["n_val"] == 64
    assert manifest.training["code"]["dicomai"]
    assert {"val_auc_macro", "val_ece", "val_sensitivity"} <= set(manifest.metrics)
    with open(out / "training_log.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    if strategy in ("two-stage", "gradual"):
        assert [int(r["phase"]) for r in rows] == [1, 2]
    assert (out / "curves.png").stat().st_size > 0
    assert (out / "checkpoints" / "last.pt").is_file()
    assert_daemon_runs(out / "package", dicom_image)


def test_the_registry_accepts_a_trained_package(pngs: Path, site: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    code, output = run("train", "--data", str(pngs), "--out", str(out), "--name", "nodule",
                       "--version", "2.0.0", "--modality", "DX", "--explanation", "gradcam++",
                       *FAST)  # fmt: skip
    assert code == 0, output
    assert load_model(out / "package").manifest.explanation == "gradcam++"
    registered = dicomai(site, "models", "register", str(out / "package"))
    assert "registered nodule 2.0.0" in registered.stdout


def test_evaluate_writes_every_number_and_they_match_scikit_learn(
    pngs: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    assert run("train", "--data", str(pngs), "--out", str(out), "--name", "n", *FAST)[0] == 0
    report_dir = tmp_path / "report"
    code, output = run("evaluate", str(out / "package"), "--data", str(pngs),
                       "--out", str(report_dir))  # fmt: skip
    assert code == 0, output
    report = json.loads((report_dir / "evaluation.json").read_text())
    with open(report_dir / "predictions.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert report["n"] == len(rows) == 24
    classes = ["nodule", "normal"]
    truth = np.array([classes.index(r["truth"]) for r in rows])
    said = np.array([classes.index(r["predicted"]) for r in rows])
    nodule = np.array([float(r["nodule"]) for r in rows])
    # The positive class is the finding, nodule (index 0).
    assert report["accuracy"] == pytest.approx(skm.accuracy_score(truth, said))
    assert report["f1_macro"] == pytest.approx(skm.f1_score(truth, said, average="macro"))
    assert report["sensitivity"] == pytest.approx(skm.recall_score(truth == 0, said == 0))
    assert report["auc_macro"] == pytest.approx(skm.roc_auc_score(truth == 0, nodule), abs=1e-6)
    assert report["brier"] == pytest.approx(skm.brier_score_loss(truth == 0, nodule), abs=1e-6)
    assert report["confusion_matrix"] == skm.confusion_matrix(truth, said).tolist()
    for name in ("roc.png", "reliability.png", "risk_coverage.png", "misclassified.png",
                 "report.md", "report.html"):  # fmt: skip
        assert (report_dir / name).stat().st_size > 0, name
    assert "| accuracy |" in (report_dir / "report.md").read_text()

    # Seed 002's uncertainty quality: does the entropy rank the errors first?
    quality = report["uncertainty"]
    p = np.clip(np.array([[float(r[c]) for c in classes] for r in rows]), 1e-12, 1)
    entropy, wrong = -(p * np.log(p)).sum(axis=1), truth != said
    assert (quality["method"], quality["samples"]) == ("none", 1)
    assert (quality["answers"], quality["errors"]) == (24, int(wrong.sum()))
    measured = quality["measures"]["entropy"]
    if wrong.any():
        assert measured["auroc"] == pytest.approx(skm.roc_auc_score(wrong, entropy), abs=1e-6)
    kept = wrong[np.argsort(entropy, kind="stable")]
    assert measured["aurc"] == pytest.approx(np.mean(np.cumsum(kept) / np.arange(1, 25)), abs=1e-6)
    assert "Uncertainty against errors" in (report_dir / "report.md").read_text()


def test_evaluate_refuses_bad_data_in_one_line_and_takes_the_package_it_is_in(
    pngs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "run"
    assert run("train", "--data", str(pngs), "--out", str(out), "--name", "n", *FAST)[0] == 0
    package = out / "package"
    monkeypatch.chdir(package)
    # "." had no name to put the report beside: a traceback.
    assert run("evaluate", ".", "--data", str(pngs))[0] == 0
    assert (out / "package-evaluation" / "evaluation.json").exists()

    bad = tmp_path / "bad"
    (bad / "nodule").mkdir(parents=True)
    (bad / "normal").mkdir()
    shutil.copy(next((pngs / "test" / "normal").glob("*.png")), bad / "normal" / "a.png")
    (bad / "nodule" / "b.dcm").write_bytes(b"not DICOM at all")
    code, output = run("evaluate", str(package), "--data", str(bad), "--out", str(tmp_path / "r"))
    assert code == 2 and output.count("\n") == 1, output
    assert "b.dcm: unreadable DICOM image" in output

    labels = tmp_path / "labels.csv"
    names = sorted(p.name for p in (pngs / "test").rglob("*.png"))[:4]
    labels.write_text(
        "Image Index,Finding Labels\n" + "".join(f"{n},nodule|normal\n" for n in names)
    )
    code, output = run("evaluate", str(package), "--data", str(pngs / "test"),
                       "--labels", str(labels), "--out", str(tmp_path / "r2"))  # fmt: skip
    error = output.splitlines()[-1]
    assert code == 2 and "Traceback" not in output, output
    assert error.endswith("several labels per image, but the package's model is single-label")


def write_dicom_csv(root: Path, multilabel: bool) -> tuple[Path, Path]:
    written = write_dicom_images(root / "images", 48, seed=3, size=SIZE)
    labels = root / "labels.csv"
    rng = np.random.default_rng(0)
    with open(labels, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["Image Index", "Finding Labels"] if multilabel else ["file", "label"])
        for item in written:
            if multilabel:
                found = ["Nodule"] if item.label else []
                found += ["Effusion"] if rng.random() < 0.4 else []
                writer.writerow([item.path.name, "|".join(found) or "No Finding"])
            else:
                writer.writerow([item.path.name, "nodule" if item.label else "normal"])
    return root / "images", labels


@pytest.mark.parametrize("multilabel", [False, True], ids=["binary", "chestxray14"])
def test_dicom_with_a_labels_csv(multilabel: bool, dicom_image: Path, tmp_path: Path) -> None:
    images, labels = write_dicom_csv(tmp_path / "data", multilabel)
    out = tmp_path / "run"
    code, output = run("train", "--data", str(images), "--labels", str(labels), "--out",
                       str(out), "--name", "csv-model", *FAST)  # fmt: skip
    assert code == 0, output
    manifest = load_model(out / "package").manifest
    assert manifest.multi_label is multilabel
    expected = ("Effusion", "Nodule") if multilabel else ("nodule", "normal")
    assert manifest.class_names == expected
    assert manifest.training["loss"]["name"] == ("bce" if multilabel else "ce")
    assert_daemon_runs(out / "package", dicom_image)
    code, output = run("evaluate", str(out / "package"), "--data", str(images), "--labels",
                       str(labels), "--out", str(tmp_path / "report"))  # fmt: skip
    assert code == 0, output
    report = json.loads((tmp_path / "report" / "evaluation.json").read_text())
    assert report["task"] == ("multilabel" if multilabel else "binary") and report["n"] == 48


class Interrupted(Exception):
    pass


def test_resume_ends_with_the_weights_of_an_uninterrupted_run(pngs: Path, tmp_path: Path) -> None:
    def settings(out: Path, resume: bool = False) -> RunSettings:
        return RunSettings(
            data=pngs, out=out, name="resumed", spec=InputSpec(size=(SIZE, SIZE)),
            fit=FitSettings(epochs=3, batch_size=16, seed=4), resume=resume,
        )  # fmt: skip

    def stop_after_two(line: str) -> None:
        if line.startswith("epoch 2/3"):
            raise Interrupted

    whole = train_package(settings(tmp_path / "whole"), log=lambda _: None)
    with pytest.raises(Interrupted):
        train_package(settings(tmp_path / "cut"), log=stop_after_two)
    lines: list[str] = []
    resumed = train_package(settings(tmp_path / "cut", resume=True), log=lines.append)
    assert "resuming after epoch 2" in lines
    assert sum(line.startswith("epoch ") for line in lines) == 1
    assert resumed.weights_sha256 == whole.weights_sha256
    assert resumed.training["best_epoch"] == whole.training["best_epoch"]


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ("no-train", "no train/ folder"),
        ("one-class", "needs at least two class folders"),
        ("empty-class", "no images"),
        ("missing-file", "'ghost.dcm' and 1 more not found"),
    ],
)
def test_bad_layouts_fail_in_one_line_before_training(
    layout: str, message: str, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    extra: list[str] = []
    if layout == "one-class":
        (data / "train" / "normal").mkdir(parents=True)
        cv2.imwrite(str(data / "train" / "normal" / "a.png"), np.zeros((8, 8), np.uint8))
    elif layout == "empty-class":
        (data / "train" / "normal").mkdir(parents=True)
        (data / "train" / "nodule").mkdir(parents=True)
        cv2.imwrite(str(data / "train" / "normal" / "a.png"), np.zeros((8, 8), np.uint8))
    elif layout == "missing-file":
        data.mkdir()
        (tmp_path / "labels.csv").write_text("file,label\nghost.dcm,nodule\nother.dcm,normal\n")
        extra = ["--labels", str(tmp_path / "labels.csv")]
    else:
        data.mkdir()
    out = tmp_path / "out"
    code, output = run("train", "--data", str(data), "--out", str(out), "--name", "x", *extra)
    assert code == 2
    assert output.startswith("error: ") and message in output, output
    assert output.count("\n") == 1
    assert not out.exists(), "nothing may be written before the data are checked"


def test_an_unknown_explanation_method_is_refused_in_one_line(pngs: Path, tmp_path: Path) -> None:
    code, output = run("train", "--data", str(pngs), "--out", str(tmp_path / "run"),
                       "--name", "nodule", "--explanation", "saliency", *FAST)  # fmt: skip
    assert code == 2
    assert "'saliency' is not one of 'gradcam', 'gradcam++', 'eigencam'" in output
    assert not (tmp_path / "run").exists()
    code, output = run("train", "--data", str(pngs), "--out", str(tmp_path / "run"),
                       "--name", "nodule", "--explanation", "relevance", *FAST)  # fmt: skip
    assert code == 2 and output.count("\n") == 1, output
    assert "explanation: relevance cannot explain tinycnn" in output
    assert not (tmp_path / "run").exists(), "the run must stop before training"


@pytest.mark.parametrize(
    ("option", "words"),
    [
        (["--lr", "-1"], "--lr"),
        (["--dropout", "1.5"], "--dropout"),
        (["--epochs", "0"], "--epochs"),
        (["--architecture", "resnet18", "--option", "tiny=maybe"], "tiny must be true or false"),
        (["--architecture", "resnet18", "--init", "JUNK"], "not a torch state_dict"),
        # Each of these ran into a traceback (or inverted the images) at the first batch.
        (["--rotation", "-1"], "--rotation"),
        (["--jitter", "5"], "--jitter"),
        (["--size", "4"], "tinycnn cannot take 4x4 inputs"),
        (["--architecture", "vit_b_16", "--size", "32"], "--option image_size=32"),
        (["--modality", "DX;CR"], "not a DICOM code string"),
        # A loss that becomes NaN: the run wrote a package with NaN temperature and thresholds.
        (["--lr", "1e30"], "training diverged"),
    ],
)
def test_bad_training_values_are_refused_before_a_package_is_written(
    pngs: Path, tmp_path: Path, option: list[str], words: str
) -> None:
    junk = tmp_path / "junk.pth"
    junk.write_bytes(bytes(range(256)) * 8)
    option = [str(junk) if value == "JUNK" else value for value in option]
    out = tmp_path / "run"
    code, output = run("train", "--data", str(pngs), "--out", str(out), "--name", "nodule",
                       *FAST, *option)  # fmt: skip
    assert code == 2, output
    assert words in output and "Traceback" not in output, output
    assert not (out / "package").exists()


def test_a_resume_without_a_checkpoint_is_an_error(pngs: Path, tmp_path: Path) -> None:
    settings = RunSettings(
        data=pngs, out=tmp_path, name="x", resume=True, spec=InputSpec((SIZE, SIZE))
    )
    with pytest.raises(DatasetError, match="no checkpoint"):
        train_package(settings, log=lambda _: None)


def test_modalities_given_with_commas_are_each_their_own(pngs: Path, tmp_path: Path) -> None:
    # "DX,CR" had been kept as one modality that no image has: the model never applied.
    out = tmp_path / "run"
    code, output = run("train", "--data", str(pngs), "--out", str(out), "--name", "nodule",
                       *FAST, "--epochs", "1", "--modality", "DX,cr", "--modality",
                       "DX")  # fmt: skip
    assert code == 0, output
    assert load_model(out / "package").manifest.applies_to.modalities == ("DX", "CR")


def test_an_error_in_a_data_loading_process_is_one_line(tmp_path: Path) -> None:
    data = write_png_folders(tmp_path / "data", n_train=8, n_test=2)
    (data / "train" / "nodule" / "train-000.png").write_bytes(b"not a png")
    out = tmp_path / "run"
    code, output = run("train", "--data", str(data), "--out", str(out), "--name", "nodule",
                       *FAST, "--workers", "1")  # fmt: skip
    assert code == 2, output
    error = output.splitlines()[-1]
    assert error.startswith("error: ") and error.endswith("train-000.png: unreadable image")
    assert "Traceback" not in output and "DataLoader" not in output, output


def test_mc_dropout_from_train_reaches_the_package_and_evaluate_judges_its_spread(
    pngs: Path, tmp_path: Path
) -> None:
    # Seed 002's MC dropout was set only by editing model.toml after training.
    out = tmp_path / "run"
    code, output = run("train", "--data", str(pngs), "--out", str(out), "--name", "mc",
                       "--dropout", "0.3", "--mc-dropout", "5", *FAST)  # fmt: skip
    assert code == 0, output
    manifest = load_model(out / "package").manifest
    assert (manifest.uncertainty.method, manifest.uncertainty.passes) == ("mc_dropout", 5)
    code, output = run("evaluate", str(out / "package"), "--data", str(pngs),
                       "--out", str(tmp_path / "report"))  # fmt: skip
    assert code == 0, output
    quality = json.loads((tmp_path / "report" / "evaluation.json").read_text())["uncertainty"]
    assert (quality["method"], quality["samples"]) == ("mc_dropout", 5)
    assert set(quality["measures"]) == {"entropy", "std", "mutual_information"}

    code, output = run("train", "--data", str(pngs), "--out", str(tmp_path / "none"), "--name",
                       "mc", "--dropout", "0", "--mc-dropout", "5", *FAST)  # fmt: skip
    assert code != 0 and "MC dropout needs dropout in the network" in output, output
