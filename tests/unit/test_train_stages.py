"""`dicomai train` runs as a user steers them: stages and early stopping, the output folder,
a resume refused for changed settings, the log kept while training, input equalisation,
augmentation settings and layer-wise decay per stage.

Everything trains tinycnn on 32² synthetic PNG folders for a few epochs, one image batch at a time.
"""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from test_train_cli import run

from dicomai.errors import DatasetError
from dicomai.imaging.spec import InputSpec
from dicomai.models.architectures import build
from dicomai.models.package import load_model
from dicomai.training import fit as fit_module
from dicomai.training.augment import Augmentation
from dicomai.training.checkpoints import LAST, load_checkpoint, save_checkpoint
from dicomai.training.fit import FitSettings
from dicomai.training.runs import RunSettings, train_package
from dicomai.training.strategies import DecayUnit, Strategy, StrategySettings, plan
from dicomai.training.synthetic import synthesize

SIZE = 32
FAST = ["--size", str(SIZE), "--normalize", "mid-grey", "--epochs", "1", "--batch-size", "8",
        "--lr", "3e-3", "--warmup-epochs", "0"]  # fmt: skip


@pytest.fixture(scope="module")
def pngs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("pngs")
    data = synthesize(20, size=SIZE, seed=0)
    for i, (image, label) in enumerate(zip(data.images, data.labels, strict=True)):
        path = root / "train" / ("nodule" if label else "normal") / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), np.rint(image * 255).astype(np.uint8))
    return root


def settings(data: Path, out: Path, **changes: Any) -> RunSettings:
    fit = FitSettings(epochs=3, batch_size=8, seed=1, warmup_epochs=0, num_workers=0)
    return RunSettings(
        data=data,
        out=out,
        name="staged",
        spec=InputSpec(size=(SIZE, SIZE)),
        **({"strategy": StrategySettings(lr=3e-3), "fit": fit} | changes),
    )


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# Early stopping and stages ---------------------------------------------------------------------


@pytest.fixture
def flat_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    """A monitored metric that never improves after the first epoch (a saturated AUC)."""
    flat = {"val_loss": 0.5, "val_accuracy": 1.0, "val_auc": 1.0, "val_f1": 1.0}
    monkeypatch.setattr(fit_module, "validate", lambda *_args, **_kw: dict(flat))


@pytest.mark.parametrize(
    ("strategy", "stopped_at", "phases"),
    [
        (StrategySettings(Strategy.TWO_STAGE, lr=3e-3, head_lr=3e-3, freeze_epochs=3), 4, 2),
        (StrategySettings(Strategy.GRADUAL, lr=3e-3, unfreeze_at=(2, 4)), 5, 3),
    ],
)
def test_early_stopping_waits_for_the_last_stage_and_says_so(
    flat_validation: None,
    pngs: Path,
    tmp_path: Path,
    strategy: StrategySettings,
    stopped_at: int,
    phases: int,
) -> None:
    # The bad-epoch count ran across stages: patience 1 ended the run in stage 1, the
    # backbone never trained, and the package still said "two-stage".
    fit = FitSettings(epochs=6, batch_size=8, seed=1, warmup_epochs=0, patience=1)
    lines: list[str] = []
    manifest = train_package(
        settings(pngs, tmp_path / "run", strategy=strategy, fit=fit), log=lines.append
    )
    epochs = [line for line in lines if line.startswith("epoch ")]
    assert len(epochs) == stopped_at, lines
    assert f"phase {phases}" in epochs[-1]
    assert (
        f"stopped early at epoch {stopped_at}: no better val auc for 1 epoch (--patience 1); "
        "best epoch 1"
    ) in lines
    table = manifest.training
    assert (table["epochs_run"], table["phases_run"], table["stopped_early"]) == (
        stopped_at,
        phases,
        True,
    )


def test_a_tie_of_the_monitored_metric_goes_to_the_lower_validation_loss(
    monkeypatch: pytest.MonkeyPatch, pngs: Path, tmp_path: Path
) -> None:
    # An AUC of 1.0 from the first, frozen-backbone epoch on kept that epoch as the best:
    # the package shipped weights its fine-tuning stage had improved on.
    losses = iter([0.6, 0.5, 0.4, 0.3, 0.3])

    def saturated(*_args: object, **_kw: object) -> dict[str, float]:
        return {"val_loss": next(losses), "val_accuracy": 1.0, "val_auc": 1.0, "val_f1": 1.0}

    monkeypatch.setattr(fit_module, "validate", saturated)
    strategy = StrategySettings(Strategy.TWO_STAGE, lr=3e-3, head_lr=3e-3, freeze_epochs=2)
    fit = FitSettings(epochs=5, batch_size=8, seed=1, warmup_epochs=0, patience=2)
    lines: list[str] = []
    manifest = train_package(
        settings(pngs, tmp_path / "run", strategy=strategy, fit=fit), log=lines.append
    )
    # Epoch 5 ties epoch 4 in both: the earlier one stays.
    assert manifest.training["best_epoch"] == 4, lines


def test_a_run_that_ends_on_its_last_epoch_did_not_stop_early(
    flat_validation: None, pngs: Path, tmp_path: Path
) -> None:
    fit = FitSettings(epochs=2, batch_size=8, seed=1, warmup_epochs=0, patience=1)
    lines: list[str] = []
    manifest = train_package(settings(pngs, tmp_path / "run", fit=fit), log=lines.append)
    assert not any(line.startswith("stopped early") for line in lines), lines
    assert manifest.training["stopped_early"] is False
    assert manifest.training["epochs_run"] == 2


def test_a_plateau_schedule_cuts_the_rate_when_the_metric_stops_improving(
    flat_validation: None, pngs: Path, tmp_path: Path
) -> None:
    # Model document 003 lowers its rate when validation stops improving; only warm-up and
    # cosine could be asked for.
    fit = FitSettings(
        epochs=6, batch_size=8, seed=1, warmup_epochs=0, schedule="plateau",
        plateau_patience=1, plateau_factor=0.5, min_lr=1e-3,
    )  # fmt: skip
    manifest = train_package(settings(pngs, tmp_path / "run", fit=fit), log=lambda _line: None)
    with open(tmp_path / "run" / "training_log.csv") as handle:
        rates = [float(row["lr"]) for row in csv.DictReader(handle)]
    # Best at epoch 1; cut after two epochs without a better AUC, never below min_lr.
    assert rates == pytest.approx([3e-3, 3e-3, 3e-3, 1.5e-3, 1.5e-3, 1e-3])
    assert manifest.training["optimisation"]["schedule"] == "plateau"


def test_a_constant_schedule_keeps_the_rate_after_its_warm_up(
    flat_validation: None, pngs: Path, tmp_path: Path
) -> None:
    # Model document 001 trains at one rate; it could only be had as a plateau schedule that
    # never cut.
    fit = FitSettings(epochs=4, batch_size=8, seed=1, warmup_epochs=1, schedule="constant")
    train_package(settings(pngs, tmp_path / "run", fit=fit), log=lambda _line: None)
    with open(tmp_path / "run" / "training_log.csv") as handle:
        rates = [float(row["lr"]) for row in csv.DictReader(handle)]
    assert rates == pytest.approx([3e-3] * 4)


def test_train_takes_the_plateau_schedule(pngs: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    code, output = run("train", "--data", str(pngs), "--out", str(out), "--name", "plateau",
                       *FAST, "--schedule", "plateau", "--plateau-patience", "3",
                       "--plateau-factor", "0.2", "--min-lr", "1e-5")  # fmt: skip
    assert code == 0, output
    fit = load_model(out / "package").manifest.training["optimisation"]
    assert (fit["schedule"], fit["plateau_patience"], fit["plateau_factor"], fit["min_lr"]) == (
        "plateau", 3, 0.2, 1e-5,
    )  # fmt: skip


def test_a_multiclass_package_keeps_the_findings_as_its_sr_reports_them(tmp_path: Path) -> None:
    # Its [metrics] held only the most probable class's numbers, which a site evaluation of
    # a multi-class model (scored as the SR reports) never names: the gate had only AUCs.
    data = synthesize(48, size=SIZE, seed=3)
    for i, (image, label) in enumerate(zip(data.images, data.labels, strict=True)):
        name = ("normal", "nodule", "mass")[i % 3] if label else "normal"
        split = "val" if i % 4 == 0 else "train"
        path = tmp_path / "data" / split / name / f"{i:03d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), np.rint(image * 255).astype(np.uint8))
    out = tmp_path / "run"
    code, output = run("train", "--data", str(tmp_path / "data"), "--out", str(out),
                       "--name", "three", *FAST, "--epochs", "2")  # fmt: skip
    assert code == 0, output
    metrics = load_model(out / "package").manifest.metrics
    code, output = run("evaluate", str(out / "package"), "--data", str(tmp_path / "data"),
                       "--split", "val", "--out", str(tmp_path / "evaluation"))  # fmt: skip
    assert code == 0, output
    evaluation = json.loads((tmp_path / "evaluation" / "evaluation.json").read_text())
    for key in ("sensitivity_macro", "specificity_macro", "ppv_macro", "npv_macro"):
        assert metrics[f"val_{key}"] == pytest.approx(evaluation[key], abs=1e-3), key


# The output folder -----------------------------------------------------------------------------


def test_a_folder_holding_a_run_is_refused_unless_resumed_or_overwritten(
    pngs: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    base = ["train", "--data", str(pngs), "--out", str(out), "--name", "nodule", *FAST]
    code, output = run(*base)
    assert code == 0, output
    weights = out / "package" / "weights.safetensors"
    before = {path: (sha256(path), path.stat().st_mtime_ns) for path in out.rglob("*")
              if path.is_file()}  # fmt: skip

    code, output = run(*base, "--seed", "7")
    assert code == 2, output
    assert output.count("\n") == 1 and "already holds a training run" in output, output
    assert "--resume" in output and "--overwrite" in output
    after = {path: (sha256(path), path.stat().st_mtime_ns) for path in out.rglob("*")
             if path.is_file()}  # fmt: skip
    assert after == before, "nothing may be written before the refusal"

    code, output = run(*base, "--resume")
    assert code == 0, output
    assert sha256(weights) == before[weights][0]

    code, output = run(*base, "--seed", "7", "--overwrite")
    assert code == 0, output
    assert sha256(weights) != before[weights][0]


def test_a_killed_run_s_folder_is_refused_too(pngs: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "last.pt").write_bytes(b"kept")
    code, output = run("train", "--data", str(pngs), "--out", str(out), "--name", "n", *FAST)
    assert code == 2 and "already holds a training run (checkpoints)" in output, output
    assert (out / "checkpoints" / "last.pt").read_bytes() == b"kept"
    assert not (out / "package").exists()


# Resume ----------------------------------------------------------------------------------------


def test_a_refused_resume_names_the_setting_that_changed(pngs: Path, tmp_path: Path) -> None:
    # Each repr was cut to 40 characters: old and new printed identically.
    out = tmp_path / "run"
    train_package(settings(pngs, out), log=lambda _: None)
    changed = settings(pngs, out, strategy=StrategySettings(lr=1e-3), resume=True)
    with pytest.raises(DatasetError, match=r"\(strategy\.lr: 0\.003, now 0\.001\)$"):
        train_package(changed, log=lambda _: None)


def test_a_checkpoint_written_before_a_setting_was_added_still_resumes(
    pngs: Path, tmp_path: Path
) -> None:
    # `lld_rates` joined the strategy settings: every earlier checkpoint, which lacks it, was
    # refused as "written by a run with other settings (strategy.lld_rates: None, now ())".
    out = tmp_path / "run"
    train_package(settings(pngs, out), log=lambda _: None)
    folder = out / "checkpoints"
    saved = load_checkpoint(folder)
    saved["fingerprint"]["strategy"].pop("lld_rates", None)  # as before the field existed
    save_checkpoint(folder, LAST, saved)

    train_package(settings(pngs, out, resume=True), log=lambda _: None)

    given = settings(pngs, out, strategy=StrategySettings(lr=3e-3, lld_rates=(1e-4,)), resume=True)
    with pytest.raises(DatasetError, match=r"strategy\.lld_rates: None, now \(0\.0001,\)"):
        train_package(given, log=lambda _: None)


def test_a_long_changed_value_is_shown_where_it_differs() -> None:
    saved = {"train": repr(["a" * 60 + "/one.png"])}
    wanted = {"train": repr(["a" * 60 + "/two.png"])}
    message = fit_module._differences(saved, wanted)
    assert "one.png" in message and "two.png" in message, message


class Interrupted(Exception):
    pass


def test_the_log_is_written_as_each_epoch_ends_and_a_resume_completes_it(
    pngs: Path, tmp_path: Path
) -> None:
    # training_log.csv was written only at the end: a killed run had none.
    def stop_after_two(line: str) -> None:
        if line.startswith("epoch 2/3"):
            raise Interrupted

    out = tmp_path / "run"
    with pytest.raises(Interrupted):
        train_package(settings(pngs, out), log=stop_after_two)
    with open(out / "training_log.csv") as handle:
        assert [int(row["epoch"]) for row in csv.DictReader(handle)] == [1, 2]
    lines: list[str] = []
    train_package(settings(pngs, out, resume=True), log=lines.append)
    with open(out / "training_log.csv") as handle:
        assert [int(row["epoch"]) for row in csv.DictReader(handle)] == [1, 2, 3]
    # The per-epoch accuracy is at 0.5; the package's uses its own thresholds.
    assert "val acc@0.5 " in next(line for line in lines if line.startswith("epoch 3/3"))


def test_a_cpu_run_records_that_it_ran_without_amp(pngs: Path, tmp_path: Path) -> None:
    fit = FitSettings(epochs=1, batch_size=8, seed=1, warmup_epochs=0, amp=True)
    manifest = train_package(
        settings(pngs, tmp_path / "run", fit=fit, device="cpu"), log=lambda _: None
    )
    assert manifest.training["optimisation"]["amp"] is False


# Input and augmentation ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "equalize", "clip"),
    [(["--equalize", "hist"], "hist", 2.0),
     (["--equalize", "clahe", "--clahe-clip", "3.5"], "clahe", 3.5)],
)  # fmt: skip
def test_equalisation_is_trained_and_kept_for_the_daemon(
    pngs: Path, tmp_path: Path, options: list[str], equalize: str, clip: float
) -> None:
    # Seed 001 equalises its histograms; no package could say so, or train on it.
    out = tmp_path / "run"
    code, output = run("train", "--data", str(pngs), "--out", str(out), "--name", "eq",
                       *FAST, *options)  # fmt: skip
    assert code == 0, output
    spec = load_model(out / "package").manifest.input
    assert (spec.equalize.value, spec.clahe_clip) == (equalize, clip)


def test_a_clahe_clip_without_clahe_is_refused(pngs: Path, tmp_path: Path) -> None:
    code, output = run("train", "--data", str(pngs), "--out", str(tmp_path / "run"),
                       "--name", "eq", *FAST, "--clahe-clip", "3")  # fmt: skip
    assert code == 2 and "--clahe-clip" in output and "--equalize clahe" in output, output
    assert not (tmp_path / "run").exists()


def test_brightness_jitter_multiplies_as_torchvision_does() -> None:
    # ±0.2 was added: a dark region at 0.1 went anywhere in [0, 0.3]; ColorJitter(0.2) gives
    # 0.1 * [0.8, 1.2].
    only_brightness = Augmentation(rotation_degrees=0, scale=0, shift=0, brightness=0.2, contrast=0)
    image = np.full((16, 16), 0.1, np.float32)
    image[8:, :] = 0.5
    for seed in range(50):
        out = only_brightness.apply(image, np.random.default_rng(seed))
        factor = out[0, 0] / 0.1
        assert 0.8 - 1e-6 <= factor <= 1.2 + 1e-6
        assert out[8:, :] == pytest.approx(np.full((8, 16), 0.5 * factor), abs=1e-6)


def test_scale_and_shift_can_be_turned_off_keeping_rotation(pngs: Path, tmp_path: Path) -> None:
    # Only --no-augment turned them off, and rotation and flips with them.
    out = tmp_path / "run"
    code, output = run("train", "--data", str(pngs), "--out", str(out), "--name", "aug",
                       *FAST, "--scale", "0", "--shift", "0", "--hflip")  # fmt: skip
    assert code == 0, output
    augmentation = load_model(out / "package").manifest.training["augmentation"]
    assert (augmentation["scale"], augmentation["shift"]) == (0, 0)
    assert augmentation["rotation_degrees"] == 7 and augmentation["hflip"] is True


def test_the_erased_area_is_chosen_and_recorded(pngs: Path, tmp_path: Path) -> None:
    # Seed 004 erases 2-33 % of the image (torchvision's RandomErasing); only 1-4 % could be
    # asked for.
    out = tmp_path / "run"
    code, output = run("train", "--data", str(pngs), "--out", str(out), "--name", "erase",
                       *FAST, "--random-erasing", "0.5", "--erasing-area", "0.02,0.33")  # fmt: skip
    assert code == 0, output
    augmentation = load_model(out / "package").manifest.training["augmentation"]
    assert augmentation["erase_probability"] == 0.5
    assert augmentation["erase_area"] == [0.02, 0.33]
    erasing = Augmentation(0, 0, 0, False, 0, 0, 1.0, (0.3, 0.33))
    image = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    for seed in range(20):
        erased = erasing.apply(image, np.random.default_rng(seed)) != image
        assert 0.25 * image.size <= erased.sum() <= 0.36 * image.size
    for bad in ("0.33,0.02", "0,0.1", "0.1", "a,b"):
        code, output = run("train", "--data", str(pngs), "--out", str(tmp_path / "bad"),
                           "--name", "erase", *FAST, "--erasing-area", bad)  # fmt: skip
        assert code == 2 and "--erasing-area" in output, output
        assert not (tmp_path / "bad").exists()


# Layer-wise decay per stage --------------------------------------------------------------------


def test_layer_decay_per_stage_gives_each_resnet_stage_one_rate() -> None:
    # Seed 002 decays per ResNet stage; per block, layer4's first block already had lr·0.1³.
    model = build("resnet18", 2)
    lld = StrategySettings(Strategy.LLD, lr=1e-3, layer_decay=0.1, lld_unit=DecayUnit.STAGE)
    (phase,) = plan(model, lld, 2)
    rate_of = {id(p): lr for params, lr in phase.groups for p in params}
    rates: dict[str, set[float]] = {}
    for name, parameter in model.named_parameters():
        part = name.split(".")[0]
        stage = "stem" if part in ("conv1", "bn1") else part
        rates.setdefault(stage, set()).add(rate_of[id(parameter)])
    expected = {"fc": 1e-3, "layer4": 1e-4, "layer3": 1e-5, "layer2": 1e-6, "layer1": 1e-7,
                "stem": 1e-8}  # fmt: skip
    assert {stage: pytest.approx(lr) for stage, lr in expected.items()} == {
        stage: only for stage, (only,) in rates.items()
    }


def test_train_takes_and_records_the_decay_unit(pngs: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    code, output = run("train", "--data", str(pngs), "--out", str(out), "--name", "lld",
                       *FAST, "--strategy", "lld", "--lld-unit", "stage")  # fmt: skip
    assert code == 0, output
    assert load_model(out / "package").manifest.training["strategy"]["lld_unit"] == "stage"


def test_given_stage_rates_train_layer2_and_layer1_alike_and_leave_the_stem_out() -> None:
    # Seed 002's groups: layer4 1e-4, layer3 1e-5, layer2 and layer1 1e-6, the head 1e-3; its
    # stem is in no group. A decay of 0.1 gave layer1 1e-7 and trained the stem at 1e-8.
    model = build("resnet18", 2)
    lld = StrategySettings(
        Strategy.LLD, lr=1e-3, lld_unit=DecayUnit.STAGE, lld_rates=(1e-4, 1e-5, 1e-6, 1e-6)
    )
    (phase,) = plan(model, lld, 2)
    rate_of = {id(p): lr for params, lr in phase.groups for p in params}
    rates: dict[str, set[float | None]] = {}
    for name, parameter in model.named_parameters():
        rates.setdefault(name.split(".")[0], set()).add(rate_of.get(id(parameter)))
    assert rates == {"fc": {1e-3}, "layer4": {1e-4}, "layer3": {1e-5}, "layer2": {1e-6},
                     "layer1": {1e-6}, "conv1": {None}, "bn1": {None}}  # fmt: skip
    with pytest.raises(DatasetError, match="6 rates, the network has 5 backbone stages"):
        plan(model, StrategySettings(Strategy.LLD, lld_unit=DecayUnit.STAGE,
                                     lld_rates=(1e-4,) * 6), 2)  # fmt: skip


def test_train_takes_and_records_stage_rates_and_refuses_bad_ones(
    pngs: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    code, output = run("train", "--data", str(pngs), "--out", str(out), "--name", "lld",
                       *FAST, "--strategy", "lld", "--lld-unit", "stage",
                       "--lld-rates", "1e-4")  # fmt: skip
    assert code == 0, output
    strategy = load_model(out / "package").manifest.training["strategy"]
    assert strategy["lld_rates"] == [1e-4]
    for strategy, bad in (("lld", "1e-4,x"), ("lld", "0,1e-5"), ("lld", "2"), ("full", "1e-4")):
        code, output = run("train", "--data", str(pngs), "--out", str(tmp_path / "bad"),
                           "--name", "lld", *FAST, "--strategy", strategy,
                           "--lld-rates", bad)  # fmt: skip
        assert code == 2 and "--lld-rates" in output and "Traceback" not in output, output
        assert not (tmp_path / "bad").exists()
