"""`dicomai evaluate` says how far a large set is, and never writes its report into the package,
among other files or over an earlier report unasked (it printed nothing for minutes, and
``--out`` the package folder put report.md and the figures beside model.toml)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from test_evaluate_not_evaluated import write_noise_pngs, write_tiny_package

from dicomai.cli import main as cli_main
from dicomai.cli import training as training_cli
from dicomai.imaging.spec import InputSpec


def evaluate(*args: str) -> Result:
    """`dicomai evaluate` in this process; stdout and stderr kept apart."""
    training_cli.register(cli_main.cli)
    result = CliRunner().invoke(cli_main.cli, ["evaluate", *args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def files_in(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture
def package(tmp_path: Path) -> Path:
    return write_tiny_package(tmp_path / "package", InputSpec(size=(32, 32)))


@pytest.fixture
def small(tmp_path: Path) -> Path:
    write_noise_pngs(tmp_path / "small", per_class=3)
    return tmp_path / "small"


def assert_refused(result: Result, *words: str) -> None:
    """Exit 2, one error line on stderr naming what to do, nothing else said."""
    assert result.exit_code == 2, result.output
    assert result.stdout == "", result.output
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
    for word in words:
        assert word in result.stderr, (word, result.stderr)


def test_a_large_set_says_how_many_images_were_read_and_evaluated_on_stderr(
    package: Path, small: Path, tmp_path: Path
) -> None:
    write_noise_pngs(tmp_path / "large", per_class=60)

    result = evaluate(str(package), "--data", str(tmp_path / "large"),
                      "--out", str(tmp_path / "report"))  # fmt: skip

    assert result.exit_code == 0, result.output
    said = result.stderr.splitlines()
    assert [line for line in said if line.startswith("read ")] == [
        f"read {12 * k}/120 images" for k in range(1, 11)
    ]
    evaluated = [line for line in said if line.startswith("evaluated ")]
    assert evaluated[-1] == "evaluated 120/120 images" and len(evaluated) <= 10, said
    # The summary stays alone on stdout, for scripts that read it.
    assert result.stdout.count("\n") == 1 and "on 120 images" in result.stdout, result.stdout

    quiet = evaluate(str(package), "--data", str(small), "--out", str(tmp_path / "small-report"))
    assert quiet.exit_code == 0, quiet.output
    assert quiet.stderr == "" and quiet.stdout.count("\n") == 1, quiet.output


@pytest.mark.parametrize("inside", [".", "reports"])
def test_the_package_folder_is_never_a_report_folder(
    package: Path, small: Path, inside: str
) -> None:
    before = files_in(package)
    for extra in ([], ["--overwrite"]):
        result = evaluate(str(package), "--data", str(small), "--out", str(package / inside),
                          *extra)  # fmt: skip

        assert_refused(result, "inside the package folder", "another --out")
        assert files_in(package) == before


def test_a_folder_with_other_files_is_refused_unless_overwrite_and_they_are_kept(
    package: Path, small: Path, tmp_path: Path
) -> None:
    # The reviewer's slip: --out naming a copy of the package.
    copy = shutil.copytree(package, tmp_path / "pkgcopy")
    before = files_in(copy)

    refused = evaluate(str(package), "--data", str(small), "--out", str(copy))

    assert_refused(refused, "already holds other files", "model.toml", "--overwrite")
    assert files_in(copy) == before
    asked = evaluate(str(package), "--data", str(small), "--out", str(copy), "--overwrite")
    assert asked.exit_code == 0, asked.output
    assert (copy / "evaluation.json").is_file()
    assert {name: files_in(copy)[name] for name in before} == before


def test_an_earlier_report_is_replaced_only_with_overwrite(
    package: Path, small: Path, tmp_path: Path
) -> None:
    out = tmp_path / "report"
    assert evaluate(str(package), "--data", str(small), "--out", str(out)).exit_code == 0
    (out / "evaluation.json").write_text('{"kept": true}')
    first = files_in(out)

    refused = evaluate(str(package), "--data", str(small), "--out", str(out))

    assert_refused(refused, "already holds an evaluation", "--overwrite")
    assert files_in(out) == first
    again = evaluate(str(package), "--data", str(small), "--out", str(out), "--overwrite")
    assert again.exit_code == 0, again.output
    assert '"kept"' not in (out / "evaluation.json").read_text()


def test_an_empty_folder_or_one_left_by_an_unfinished_evaluation_is_used(
    package: Path, small: Path, tmp_path: Path
) -> None:
    (tmp_path / "empty").mkdir()
    assert (
        evaluate(str(package), "--data", str(small), "--out", str(tmp_path / "empty")).exit_code
        == 0
    )
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "predictions.csv").write_text("file,truth\n")
    result = evaluate(str(package), "--data", str(small), "--out", str(unfinished))
    assert result.exit_code == 0, result.output
    assert (unfinished / "evaluation.json").is_file()


def test_a_file_is_not_a_report_folder(package: Path, small: Path, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")

    result = evaluate(str(package), "--data", str(small), "--out", str(tmp_path / "notes.txt"),
                      "--overwrite")  # fmt: skip

    assert_refused(result, "not a folder")
    assert (tmp_path / "notes.txt").read_text() == "mine"
