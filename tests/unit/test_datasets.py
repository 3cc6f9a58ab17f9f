"""Reading training data: image folders, labels CSVs (ChestX-ray14 style), splits and errors."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from dicomai.errors import DatasetError
from dicomai.imaging.spec import InputSpec
from dicomai.models.architectures import build
from dicomai.training.augment import Augmentation
from dicomai.training.batches import ImageDataset
from dicomai.training.datasets import (
    Task,
    load_evaluation_data,
    load_training_data,
    read_image01,
)
from dicomai.training.strategies import (
    MAX_BLOCKS,
    Strategy,
    StrategySettings,
    backbone_blocks,
    find_head,
    plan,
    set_trainable,
)


def image(path: Path, value: int = 128, dtype: type = np.uint8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((16, 16), value, dtype))
    return path


def test_folders_with_a_given_val_set(tmp_path: Path) -> None:
    for split, n in (("train", 4), ("val", 2), ("test", 1)):
        for name in ("a", "b", "c"):
            for i in range(n):
                image(tmp_path / split / name / f"{i}.png")
    data = load_training_data(tmp_path)
    assert data.classes == ("a", "b", "c") and data.task is Task.MULTICLASS
    assert (len(data.train), len(data.val), len(data.test or ())) == (12, 6, 3)
    assert data.summary()["validation"] == "given"


def test_stratified_validation_when_none_is_given(tmp_path: Path) -> None:
    for i in range(10):
        image(tmp_path / "train" / "normal" / f"{i}.png")
    for i in range(5):
        image(tmp_path / "train" / "nodule" / f"{i}.jpg")
    data = load_training_data(tmp_path, val_fraction=0.2, seed=1)
    assert data.task is Task.BINARY
    assert np.bincount(data.val.targets).tolist() == [1, 2]
    assert not set(data.train.paths) & set(data.val.paths)


def test_chestxray14_csv_is_multilabel_with_no_finding_as_empty(tmp_path: Path) -> None:
    for i in range(6):
        image(tmp_path / "images_001" / "images" / f"0000{i}_000.png")
    (tmp_path / "Data_Entry.csv").write_text(
        "Image Index,Finding Labels,Follow-up #\n"
        "00000_000.png,Cardiomegaly|Effusion,0\n00001_000.png,No Finding,0\n"
        "00002_000.png,Effusion,0\n00003_000.png,No Finding,0\n"
        "00004_000.png,Cardiomegaly,0\n00005_000.png,Effusion,0\n"
    )
    data = load_training_data(tmp_path, tmp_path / "Data_Entry.csv", val_fraction=0.3)
    assert data.task is Task.MULTILABEL and data.classes == ("Cardiomegaly", "Effusion")
    everything = np.concatenate([data.train.targets, data.val.targets])
    assert everything.sum(axis=0).tolist() == [2, 3]
    assert len(data.train) + len(data.val) == 6


def test_a_csv_split_column_assigns_sets(tmp_path: Path) -> None:
    rows = ["file,label,split"]
    for i in range(8):
        image(tmp_path / f"{i}.png")
        rows.append(f"{i}.png,{'yes' if i % 2 else 'no'},{'val' if i >= 6 else 'train'}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    data = load_training_data(tmp_path, tmp_path / "labels.csv")
    assert (len(data.train), len(data.val)) == (6, 2)


def test_evaluation_names_a_missing_split_folder_and_warns_of_a_csv_without_splits(
    tmp_path: Path,
) -> None:
    for split in ("train", "val"):
        for name in ("no", "yes"):
            image(tmp_path / split / name / "0.png")
    with pytest.raises(DatasetError, match=r"no test/ folder \(it has train, val\)"):
        load_evaluation_data(tmp_path, ("no", "yes"))

    rows = ["file,label"] + [f"train/{n}/0.png,{n}" for n in ("no", "yes")]
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    said: list[str] = []
    data = load_evaluation_data(tmp_path, ("no", "yes"), tmp_path / "labels.csv", log=said.append)
    assert len(data) == 2
    assert len(said) == 1 and "no split column: every row is evaluated" in said[0]


@pytest.mark.parametrize(
    ("csv", "message"),
    [
        ("name,label\na.png,x\n", "no file column"),
        ("file,label\na.png,x\nb.png,y\nc.png,z,extra\n", "csv:3: 'b.png' and 1 more not found"),
        ("file,label,split\na.png,x,holdout\n", "split 'holdout'"),
        ("file,label\na.png,x\n\nsub/b.png,y\n", "csv:4: 'sub/b.png' not found"),
        ("file,label\na.png,x\na.png,y\n", "csv:3: 'a.png' is labelled 'y' here and 'x' on line 2"),
        (
            "Image Index,Finding Labels\na.png,x|z\n./a.png,z|x\n",
            "csv:3: './a.png' is listed again \\(first on line 2",
        ),
        ("file,label\nb.png,\na.png,x\n", "csv:2: no label"),
    ],
)
def test_csv_errors_name_the_problem(csv: str, message: str, tmp_path: Path) -> None:
    image(tmp_path / "a.png")
    (tmp_path / "labels.csv").write_text(csv)
    with pytest.raises(DatasetError, match=message):
        load_training_data(tmp_path, tmp_path / "labels.csv")


def labels_csv(root: Path, rows: list[str], header: str = "file,label") -> Path:
    """`rows` of `header` as labels.csv, an image for each file named."""
    for row in rows:
        image(root / row.split(",")[0])
    (root / "labels.csv").write_text("\n".join([header, *rows]) + "\n")
    return root / "labels.csv"


def test_only_a_bare_file_name_is_looked_for_at_any_depth_and_only_if_unique(
    tmp_path: Path,
) -> None:
    rows = [f"patient{i}/IM0001.png,{'yes' if i % 2 else 'no'}" for i in range(6)]
    labels = labels_csv(tmp_path, [*rows, "deep/only.png,yes"])
    with open(labels, "a") as handle:
        handle.write("patientC/IM0001.png,yes\n")
    with pytest.raises(DatasetError, match=r"labels.csv:9: 'patientC/IM0001.png' not found"):
        load_training_data(tmp_path, labels)

    labels.write_text("\n".join(["file,label", *rows, "only.png,yes"]) + "\n")
    data = load_training_data(tmp_path, labels)
    assert tmp_path / "deep" / "only.png" in data.train.paths + data.val.paths

    with open(labels, "a") as handle:
        handle.write("IM0001.png,no\n")
    with pytest.raises(DatasetError, match=r"labels.csv:9: 'IM0001.png' matches 6 files"):
        load_training_data(tmp_path, labels)


def test_a_patient_id_column_keeps_each_patient_on_one_side(tmp_path: Path) -> None:
    rows = [f"{i:03d}.png,{'Nodule' if i % 3 == 0 else 'No Finding'},P{i // 4}" for i in range(60)]
    labels = labels_csv(tmp_path, rows, "Image Index,Finding Labels,Patient ID")
    data = load_training_data(tmp_path, labels, val_fraction=0.2, seed=2)

    def patients(paths: tuple[Path, ...]) -> set[int]:
        return {int(path.stem) // 4 for path in paths}

    both = patients(data.train.paths) & patients(data.val.paths)
    assert not both, f"patients {sorted(both)} are in both training and validation"
    assert len(patients(data.val.paths)) == 3 and data.val.targets.sum() > 0
    assert "training patients" in data.summary()["validation"]


@pytest.mark.parametrize("layout", ["val-folder", "val-fraction", "csv-split"])
def test_a_class_without_training_or_validation_images_is_refused(
    layout: str, tmp_path: Path
) -> None:
    labels = None
    if layout == "val-folder":
        for name, n in (("normal", 6), ("nodule", 6)):
            for i in range(n):
                image(tmp_path / "train" / name / f"{i}.png")
        image(tmp_path / "val" / "normal" / "0.png")
        expected = "class 'nodule' has no validation image$"
    elif layout == "val-fraction":
        for name, n in (("normal", 10), ("nodule", 2)):
            for i in range(n):
                image(tmp_path / "train" / name / f"{i}.png")
        expected = "class 'nodule' has no training image \\(validation set: stratified 80 %"
    else:
        rows = [
            f"{i}.png,{'yes' if i % 2 else 'no'},{'val' if i % 2 else 'train'}" for i in range(8)
        ]
        labels = labels_csv(tmp_path, rows, "file,label,split")
        expected = "labels.csv: class 'yes' has no training image$"
    with pytest.raises(DatasetError, match=expected):
        load_training_data(tmp_path, labels, val_fraction=0.8)


def test_class_names_differing_only_in_case_are_refused(tmp_path: Path) -> None:
    rows = [f"{i}.png,{('normal', 'Normal', 'nodule')[i % 3]}" for i in range(9)]
    labels = labels_csv(tmp_path, rows)
    with pytest.raises(DatasetError, match="classes 'Normal' and 'normal' differ only in case"):
        load_training_data(tmp_path, labels)


def test_a_csv_must_be_utf8_with_or_without_a_byte_order_mark(tmp_path: Path) -> None:
    rows = [f"radiographie_{i}_\u00e9.png,{'yes' if i % 2 else 'no'}" for i in range(8)]
    labels = labels_csv(tmp_path, rows)
    text = labels.read_text()
    labels.write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert len(load_training_data(tmp_path, labels).train) == 6
    labels.write_bytes(text.encode("cp1252"))
    with pytest.raises(DatasetError, match=r"labels.csv:2: not UTF-8 text; save the CSV as UTF-8"):
        load_training_data(tmp_path, labels)
    with pytest.raises(DatasetError, match="not UTF-8"):
        load_evaluation_data(tmp_path, ("no", "yes"), labels)


def test_sixteen_bit_png_reads_to_unit_range(tmp_path: Path) -> None:
    path = image(tmp_path / "a.png", 65535, np.uint16)
    assert read_image01(path).max() == pytest.approx(1.0)


def test_augmented_inputs_repeat_for_the_same_epoch_and_change_with_it(tmp_path: Path) -> None:
    for i in range(3):
        image(tmp_path / "train" / "a" / f"{i}.png", 40 * i + 20)
        image(tmp_path / "train" / "b" / f"{i}.png", 200)
    data = load_training_data(tmp_path)
    spec = InputSpec(size=(16, 16))
    dataset = ImageDataset(data.train, spec, Augmentation(), seed=3)
    first = dataset[0][0]
    assert torch.equal(first, dataset[0][0])
    dataset.set_epoch(1)
    assert not torch.equal(first, dataset[0][0])
    assert first.shape == (3, 16, 16)


def test_strategies_train_what_they_say() -> None:
    model = build("tinycnn", 2)
    head = {id(p) for p in find_head(model).parameters()}
    everything = {id(p) for p in model.parameters()}
    frozen = plan(model, StrategySettings(Strategy.FROZEN), 3)
    assert frozen[0].parameters() == head
    two = plan(
        model, StrategySettings(Strategy.TWO_STAGE, lr=1e-4, head_lr=3e-4, freeze_epochs=1), 3
    )
    assert [(p.start, p.stop) for p in two] == [(0, 1), (1, 3)]
    assert two[0].groups[0][1] == 3e-4 and two[1].parameters() == everything
    lld = plan(model, StrategySettings(Strategy.LLD, lr=1.0, layer_decay=0.5), 3)
    assert [lr for _, lr in lld[0].groups][:3] == [1.0, 0.5, 0.25]
    gradual = plan(model, StrategySettings(Strategy.GRADUAL, unfreeze_at=(1, 2)), 3)
    sizes = [len(p.parameters()) for p in gradual]
    assert sizes[0] == len(head) and sizes[0] < sizes[1] < sizes[2] == len(everything)
    with pytest.raises(DatasetError, match="freeze-epochs"):
        plan(model, StrategySettings(Strategy.TWO_STAGE, freeze_epochs=3), 3)


def test_frozen_multitask_trains_its_attention_classifier_and_decoder_not_its_encoder() -> None:
    model = build("resnet50_multitask", 2, tiny=True)
    (phase,) = plan(model, StrategySettings(Strategy.FROZEN), 2)
    trained = phase.parameters()
    for name in ("attention", "classifier", "lateral", "smooth", "mask_head"):
        part = {id(p) for p in getattr(model, name).parameters()}
        assert part and part <= trained, f"{name} would stay untrained"
    assert not {id(p) for p in model.encoder.parameters()} & trained
    blocks = {id(p) for block in backbone_blocks(model) for p in block}
    assert blocks == {id(p) for p in model.parameters()} - trained


def test_frozen_hybrid_trains_its_projections_and_gate_not_its_backbones() -> None:
    # Only `head` was trained: the projections to 512 and the attention gate stayed random.
    model = build("hybrid_resnet50_densenet121", 2, tiny=True, attention_gate=True)
    (phase,) = plan(model, StrategySettings(Strategy.FROZEN), 2)
    trained = phase.parameters()
    for name in ("project", "gate", "head"):
        part = {id(p) for p in getattr(model, name).parameters()}
        assert part and part <= trained, f"{name} would stay untrained"
    assert not {id(p) for p in model.resnet.parameters()} & trained


def test_blocks_the_network_froze_stay_frozen_in_every_phase() -> None:
    # `frozen_blocks = 2` was undone: every phase switched the blocks' gradients back on.
    model = build("densenet121_transformer", 2, tiny=True, frozen_blocks=2)
    frozen = {id(p) for p in model.densenet.features.denseblock1.parameters()}
    assert frozen
    for strategy in (Strategy.FULL, Strategy.LLD, Strategy.FROZEN):
        for phase in plan(model, StrategySettings(strategy), 2):
            assert not frozen & phase.parameters(), strategy
            set_trainable(model.train(), phase)
            norms = [
                m
                for m in model.densenet.features.denseblock1.modules()
                if isinstance(m, torch.nn.BatchNorm2d)
            ]
            assert norms and not any(m.training for m in norms), strategy


def test_layer_wise_decay_reaches_each_vit_layer_and_leaves_no_stem_at_zero() -> None:
    # The ViT's twelve encoder layers were one block (one rate); DenseNet-121's 58 dense
    # layers were a block each, its stem at 0.75^64 of the head's rate.
    settings = StrategySettings(Strategy.LLD, lr=1.0, layer_decay=0.75)
    vit = build("vit_b_16", 2)
    (phase,) = plan(vit, settings, 2)
    rates = {id(p): lr for group, lr in phase.groups for p in group}
    layers = [rates[id(next(layer.parameters()))] for layer in vit.encoder.layers]
    assert layers == sorted(layers) and len(set(layers)) == 12, layers
    dense = build("densenet121", 2)
    (phase,) = plan(dense, settings, 2)
    stem = {id(p): lr for group, lr in phase.groups for p in group}[id(dense.features.conv0.weight)]
    assert stem >= 0.75**MAX_BLOCKS, stem


def test_frozen_transformer_trains_the_whole_transformer_not_its_densenet() -> None:
    # Only `head` was trained: the token projection, class token, positions and encoder
    # layers stayed at their random initial values for the whole "frozen" run.
    model = build("densenet121_transformer", 2, tiny=True)
    (phase,) = plan(model, StrategySettings(Strategy.FROZEN), 2)
    trained = phase.parameters()
    new = [model.class_token, model.class_position, model.positions]
    for name in ("tokens", "encoder", "norm", "head"):
        new += list(getattr(model, name).parameters())
    assert {id(p) for p in new} <= trained
    assert not {id(p) for p in model.densenet.parameters()} & trained
