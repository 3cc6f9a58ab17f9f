"""The classes' codes in a trained package: what a codes file says, and nothing it did not."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dicomai.errors import DatasetError
from dicomai.training.datasets import Task
from dicomai.training.package_writer import choose_thresholds, class_specs, read_codes

HALF = np.array([0.5, 0.5])


def codes_file(tmp_path: Path, rows: str, encoding: str = "utf-8") -> Path:
    path = tmp_path / "codes.csv"
    path.write_text("name,value,scheme,meaning,is_finding\n" + rows, encoding=encoding)
    return path


@pytest.mark.parametrize(
    ("flag", "finding"), [("Y", True), ("yes", True), ("0", False), ("", None)]
)
def test_is_finding_reads_yes_and_no_in_any_spelling(
    tmp_path: Path, flag: str, finding: bool | None
) -> None:
    codes = read_codes(codes_file(tmp_path, f"nodule,27925004,SCT,Nodule,{flag}\n"))
    assert codes["nodule"][1] is finding


def test_an_is_finding_that_is_neither_yes_nor_no_is_refused(tmp_path: Path) -> None:
    # "x" (or "ja") was read as "not a finding": the model never said a nodule was present.
    with pytest.raises(DatasetError, match=r"line 3: is_finding 'x' is neither true"):
        read_codes(
            codes_file(tmp_path, "normal,17621005,SCT,Normal,0\nnodule,27925004,SCT,Nodule,x\n")
        )


def test_a_codes_file_that_is_not_utf8_is_one_line(tmp_path: Path) -> None:
    path = codes_file(tmp_path, "nodule,1,99X,Léision,1\n", encoding="cp1252")
    with pytest.raises(DatasetError, match="not UTF-8") as raised:
        read_codes(path)
    assert "\n" not in str(raised.value)


def test_a_class_given_twice_is_refused(tmp_path: Path) -> None:
    rows = "nodule,27925004,SCT,Nodule,1\nnodule,1,99X,Other,1\n"
    with pytest.raises(DatasetError, match="class 'nodule' is given twice"):
        read_codes(codes_file(tmp_path, rows))


def test_codes_for_classes_the_data_lacks_are_refused(tmp_path: Path) -> None:
    # A capitalised "Nodule" was silently ignored: the class kept a local code.
    codes = read_codes(codes_file(tmp_path, "Nodule,27925004,SCT,Nodule,1\n"))
    with pytest.raises(DatasetError, match="classes the data does not have: 'Nodule'"):
        class_specs(("normal", "nodule"), HALF, codes)


def test_classes_sharing_their_first_16_characters_get_codes_of_their_own() -> None:
    names = ("consolidation_left_upper", "consolidation_left_lower")
    specs = class_specs(names, HALF, {})
    values = [spec.code.value for spec in specs]
    assert len(set(values)) == 2 and all(len(value) <= 16 for value in values), values
    assert [spec.code.meaning for spec in specs] == list(names)


def test_local_codes_are_ascii_and_keep_short_names_as_they_are() -> None:
    specs = class_specs(("nodule", "pleural effusion", "läsion_结节"), np.full(3, 0.5), {})
    assert [spec.code.value for spec in specs][:2] == ["NODULE", "PLEURAL EFFUSION"]
    assert specs[2].code.value.isascii() and specs[2].code.meaning == "läsion_结节"


def test_a_model_without_a_finding_class_is_refused(tmp_path: Path) -> None:
    codes = read_codes(codes_file(tmp_path, "nodule,27925004,SCT,Nodule,no\n"))
    with pytest.raises(DatasetError, match="no class is a finding"):
        class_specs(("normal", "nodule"), HALF, codes)


def test_two_classes_given_one_code_are_refused(tmp_path: Path) -> None:
    rows = "a,27925004,SCT,Nodule,1\nb,27925004,SCT,Nodule,1\n"
    with pytest.raises(DatasetError, match="classes 'a' and 'b' would share the code"):
        class_specs(("a", "b"), HALF, read_codes(codes_file(tmp_path, rows)))


@pytest.mark.parametrize("positive", [0, 1])
def test_a_binary_models_two_thresholds_never_contradict_each_other(positive: int) -> None:
    # Chosen apart, benign 0.48 and malignant 0.53 left images with both findings Absent.
    rng = np.random.default_rng(0)
    targets = rng.integers(0, 2, 600)
    score = np.clip(0.5 * targets + rng.normal(0.25, 0.2, 600), 0, 1)
    probabilities = np.stack([1 - score, score], axis=1)
    thresholds = choose_thresholds(probabilities, targets, Task.BINARY, positive)
    present = probabilities >= thresholds
    assert present.sum(axis=1).tolist() == [1] * 600, thresholds
