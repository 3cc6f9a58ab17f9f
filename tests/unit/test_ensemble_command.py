"""`dicomai ensemble` and the package writers it uses: two tinycnn runs of different seeds
joined into one package whose temperature, thresholds and metrics are the ensemble's own (and
`dicomai evaluate` reproduces them), members that differ in more than their weights refused,
and no package written over a folder that holds anything unless asked.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from dicomai.cli import ensemble as ensemble_cli
from dicomai.cli import main as cli_main
from dicomai.errors import ModelPackageError
from dicomai.evaluation.report import evaluate_package
from dicomai.imaging.spec import InputSpec
from dicomai.inference.types import Code
from dicomai.models.architectures import build
from dicomai.models.manifest import ClassSpec, Manifest
from dicomai.models.package import load_model, read_manifest, write_ensemble_package, write_package
from dicomai.training.ensemble import fit_ensemble_temperature
from dicomai.training.fit import FitSettings
from dicomai.training.package_writer import calibrate
from dicomai.training.runs import RunSettings, train_package
from dicomai.training.strategies import StrategySettings
from dicomai.training.synthetic import synthesize

SIZE = 32


def run(*args: str) -> tuple[int, str, str]:
    """The `dicomai` command in this process: exit code, stdout, stderr."""
    ensemble_cli.register(cli_main.cli)
    result = CliRunner().invoke(cli_main.cli, list(args))
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def one_line_error(stderr: str) -> str:
    """The error line, after any progress lines; it must be the only one and the last."""
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and stderr.splitlines()[-1] == errors[0], stderr
    assert "Traceback" not in stderr, stderr
    return errors[0]


def contents(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.fixture(scope="module")
def pngs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pngs")
    for split, count, seed in (("train", 24, 0), ("val", 16, 1)):
        data = synthesize(count, size=SIZE, seed=seed)
        for i, (image, label) in enumerate(zip(data.images, data.labels, strict=True)):
            path = root / split / ("nodule" if label else "normal") / f"{i:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(path), np.rint(image * 255).astype(np.uint8))
    return root


@pytest.fixture(scope="module")
def runs(pngs: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two runs that differ only in their seed."""
    root = tmp_path_factory.mktemp("runs")
    folders = []
    for seed in (1, 2):
        out = root / f"seed{seed}"
        settings = RunSettings(
            data=pngs,
            out=out,
            name="nodule",
            spec=InputSpec(size=(SIZE, SIZE)),
            strategy=StrategySettings(lr=3e-3),
            fit=FitSettings(epochs=2, batch_size=8, seed=seed, warmup_epochs=0, num_workers=0),
            device="cpu",
        )
        train_package(settings, log=lambda _: None)
        folders.append(out)
    return folders


def test_joined_runs_load_as_an_ensemble_whose_metrics_evaluate_reproduces(
    pngs: Path, runs: list[Path], tmp_path: Path
) -> None:
    out = tmp_path / "ensemble"
    code, stdout, stderr = run(
        "ensemble", str(out), str(runs[0]), str(runs[1] / "package"),
        "--name", "nodule-ensemble", "--version", "2.0.0", "--data", str(pngs),
    )  # fmt: skip
    assert code == 0, stderr
    assert stdout == f"nodule-ensemble 2.0.0: {out}\n"
    assert "member " in stderr and "wrote " in stderr, "progress goes to stderr"

    loaded = load_model(out)
    manifest = loaded.manifest
    assert manifest.uncertainty.method == "ensemble"
    assert len(loaded.members) == 2
    members = [read_manifest(run / "package") for run in runs]
    assert [m["weights_sha256"] for m in manifest.training["ensemble_of"]] == [
        m.weights_sha256 for m in members
    ]
    assert [m["seed"] for m in manifest.training["ensemble_of"]] == [1, 2]
    assert manifest.ensemble[0].sha256 == members[1].weights_sha256

    report = evaluate_package(out, pngs, tmp_path / "evaluation", split="val", log=lambda _: None)
    assert manifest.metrics["val_n"] == report["n"] == 16
    for key in ("accuracy", "auc_macro", "ece", "brier", "sensitivity", "specificity"):
        assert manifest.metrics[f"val_{key}"] == pytest.approx(report[key], abs=1e-6), key
    assert report["model"]["temperature"] == manifest.temperature


def test_an_existing_out_is_refused_and_left_as_it_was(
    pngs: Path, runs: list[Path], tmp_path: Path
) -> None:
    # The recipe's script had written over a trained run's package given as its output.
    taken = runs[0] / "package"
    before = contents(runs[0])
    code, _, stderr = run(
        "ensemble", str(taken), str(runs[0]), str(runs[1]), "--name", "e", "--data", str(pngs)
    )
    assert code == 2
    assert stderr.count("\n") == 1 and "is not empty" in stderr and "--overwrite" in stderr, stderr
    assert contents(runs[0]) == before

    code, _, stderr = run(
        "ensemble", str(taken), str(runs[0]), str(runs[1]), "--name", "e", "--data", str(pngs),
        "--overwrite",
    )  # fmt: skip
    assert code == 2 and "is one of the packages to join" in one_line_error(stderr)
    assert contents(runs[0]) == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((), "two or more packages, got 0"),
        (("only",), "two or more packages, got 1"),
        (("missing", "missing2"), "missing: no such package folder"),
    ],
)
def test_bad_arguments_are_one_line_errors(
    pngs: Path, runs: list[Path], tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    paths = [str(runs[0]) if arg == "only" else str(tmp_path / arg) for arg in args]
    out = tmp_path / "ensemble"
    code, _, stderr = run("ensemble", str(out), *paths, "--name", "e", "--data", str(pngs))
    assert code == 2 and message in one_line_error(stderr)
    assert not out.exists()


def test_a_missing_data_folder_is_a_one_line_error(runs: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "ensemble"
    missing = tmp_path / "nothing"
    code, _, stderr = run(
        "ensemble", str(out), *map(str, runs), "--name", "e", "--data", str(missing)
    )
    assert code == 2 and one_line_error(stderr) == f"error: {missing}: not a folder"
    assert not out.exists()


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"input": InputSpec(size=(SIZE + 4, SIZE + 4))}, "input.size (36, 36), not (32, 32)"),
        ({"options": {"dropout": 0.3}}, "options.dropout 0.3, not None"),
        ("classes", "classes ('nodule', 'mass'), not ('nodule', 'normal')"),
    ],
)
def test_members_that_differ_in_more_than_weights_are_refused(
    pngs: Path, runs: list[Path], tmp_path: Path, change: object, field: str
) -> None:
    manifest = read_manifest(runs[1] / "package")
    state = load_model(runs[1] / "package").module.state_dict()
    if change == "classes":
        renamed = replace(manifest.classes[1], name="mass")
        manifest = replace(manifest, classes=(manifest.classes[0], renamed))
    else:
        assert isinstance(change, dict)
        manifest = replace(manifest, **change)
    other = tmp_path / "other"
    write_package(other, manifest, state)
    out = tmp_path / "ensemble"
    code, _, stderr = run(
        "ensemble", str(out), str(runs[0]), str(other), "--name", "e", "--data", str(pngs)
    )
    assert code == 2
    error = one_line_error(stderr)
    assert f"differs from {runs[0] / 'package'} in more than its weights: {field}" in error
    assert not out.exists()


@pytest.mark.parametrize("multilabel", [False, True])
def test_the_ensemble_temperature_of_identical_members_is_calibrate_s(multilabel: bool) -> None:
    # The daemon tempers each member, then averages: with members alike, one network's fit.
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(40, 3, generator=generator).numpy() * 4
    targets = (np.arange(120).reshape(40, 3) % 2) if multilabel else np.arange(40) % 3
    single = calibrate(logits, targets, multilabel)
    assert not 0.99 < single < 1.01
    for members in (logits[None], np.stack([logits, logits])):
        fitted = fit_ensemble_temperature(members, targets, multilabel)
        assert fitted == pytest.approx(single, rel=1e-4)


# The package writers ---------------------------------------------------------------------------


def tiny_manifest() -> Manifest:
    classes = (
        ClassSpec("normal", Code("17621005", "SCT", "Normal"), 0.5, is_finding=False),
        ClassSpec("nodule", Code("27925004", "SCT", "Nodule"), 0.5, is_finding=True),
    )
    return Manifest(name="tiny", version="1.0.0", architecture="tinycnn", classes=classes)


def test_a_package_is_not_written_over_a_folder_that_holds_anything(tmp_path: Path) -> None:
    manifest = tiny_manifest()
    state = build("tinycnn", 2).state_dict()
    folder = tmp_path / "package"
    write_package(folder, manifest, state)
    before = contents(folder)
    with pytest.raises(ModelPackageError, match=r"is not empty \(model.toml, weights"):
        write_package(folder, manifest, build("tinycnn", 2).state_dict())
    with pytest.raises(ModelPackageError, match="is not empty"):
        write_ensemble_package(folder, manifest, [state, state])
    assert contents(folder) == before
    empty = tmp_path / "empty"
    empty.mkdir()
    write_package(empty, manifest, state)
    assert load_model(empty).manifest.weights_sha256


def test_overwriting_an_ensemble_leaves_no_stale_member_beside_it(tmp_path: Path) -> None:
    manifest = tiny_manifest()
    states = [build("tinycnn", 2).state_dict() for _ in range(3)]
    folder = tmp_path / "package"
    write_ensemble_package(folder, manifest, states)
    (folder / "notes.txt").write_text("kept")
    assert (folder / "member2.safetensors").exists()

    write_ensemble_package(folder, manifest, states[:2], overwrite=True)
    assert sorted(p.name for p in folder.iterdir()) == [
        "member1.safetensors", "model.toml", "notes.txt", "weights.safetensors",
    ]  # fmt: skip
    assert len(load_model(folder).members) == 2

    write_package(folder, manifest, states[0], overwrite=True)
    assert not (folder / "member1.safetensors").exists()
    assert load_model(folder).members == ()
