"""The CLI answers bad input and a bad environment with one line and a non-zero exit."""

from __future__ import annotations

import subprocess
import tarfile
from pathlib import Path

import pytest
from daemon import dicomai

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "dicomai.toml"
    path.write_text(f'[storage]\ndir = "{tmp_path / "var"}"\n')
    return path


def one_line_error(result: subprocess.CompletedProcess[str], code: int, words: str) -> None:
    assert result.returncode == code, result.stdout + result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], result.stderr


def test_commands_on_a_database_never_upgraded_say_to_upgrade(config: Path) -> None:
    # The file does not exist yet: it is not created (a mistyped path would become a database).
    one_line_error(dicomai(config, "jobs", "list", check=False), 2, "run `dicomai db upgrade`")


def test_a_worker_refuses_a_schema_that_is_not_current(config: Path) -> None:
    # A worker updated before serve ran `db upgrade` must not write into the old schema.
    result = dicomai(config, "worker", "--device", "cpu", check=False, timeout=120)
    one_line_error(result, 2, "the database schema is not current: run `dicomai db upgrade`")


def test_db_upgrade_on_a_current_database_records_nothing(config: Path) -> None:
    first = dicomai(config, "db", "upgrade")
    again = dicomai(config, "db", "upgrade")
    assert "already current" in again.stdout and "already current" not in first.stdout
    rows = dicomai(config, "audit", "list", "--action", "db.upgraded").stdout
    assert rows.count("db.upgraded") == 1, rows


@pytest.mark.parametrize(
    ("env", "code", "words"),
    [
        ({"DICOMAI_DATABASE__URL": "mysql://x/y"}, 2, "mysql is not supported"),
        ({"DICOMAI_LOG_LEVEL": "LOUD"}, 2, "log_level must be one of"),
        ({"DICOMAI_STORAGE__DIR": "/proc/dicomai-nope"}, 2, "/proc/dicomai-nope"),
    ],
)
def test_a_bad_environment_is_one_line(
    config: Path, env: dict[str, str], code: int, words: str
) -> None:
    one_line_error(dicomai(config, "jobs", "list", check=False, env=env), code, words)


def test_a_database_file_that_is_not_one(config: Path, tmp_path: Path) -> None:
    (tmp_path / "not.db").write_text("these are not the tables you are looking for\n")
    env = {"DICOMAI_DATABASE__URL": f"sqlite:///{tmp_path / 'not.db'}"}
    one_line_error(dicomai(config, "db", "upgrade", check=False, env=env), 3, "not a database")


def test_unusable_package_archives_are_refused_in_one_line(config: Path, tmp_path: Path) -> None:
    dicomai(config, "db", "upgrade")
    whole = tmp_path / "demo.tar"
    with tarfile.open(whole, "w") as tar:
        tar.add(REPO / "models" / "demo-chest-nodule", arcname="demo-chest-nodule")
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(whole.read_bytes()[:20000])
    escaping = tmp_path / "escaping.tar"
    with tarfile.open(escaping, "w") as tar:
        member = tarfile.TarInfo("../outside.txt")
        member.size = 0
        tar.addfile(member)
    for archive in (truncated, escaping):
        result = dicomai(config, "models", "register", str(archive), check=False)
        one_line_error(result, 2, "unusable archive")
    assert not (tmp_path / "outside.txt").exists()


def test_train_demo_refuses_an_output_that_cannot_be_a_folder_before_training(
    config: Path, tmp_path: Path
) -> None:
    taken = tmp_path / "a-file"
    taken.write_text("x")
    result = dicomai(config, "train-demo", str(taken), check=False, timeout=60)
    one_line_error(result, 2, "exists and is not a folder")
    assert "epoch" not in result.stdout


def test_an_age_before_year_one_is_refused(config: Path) -> None:
    dicomai(config, "db", "upgrade")
    result = dicomai(config, "audit", "list", "--since", "99999999d", check=False)
    one_line_error(result, 2, "--since")


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("jobs", "show", "99999999999999999999999"), "JOB_ID"),
        (("jobs", "list", "--limit", "-1"), "--limit"),
        (("deliveries", "retry", "99999999999999999999999"), "[ID]..."),
        (("audit", "list", "--limit", "0"), "--limit"),
        (("train-demo", "out", "--seed", "-1"), "--seed"),
        # Refused before any training, not by `models register` after it.
        (("train", "--name", "a b", "--data", "d", "--out", "o"), "--name"),
        (("train", "--name", "ok", "--version", "1.0", "--data", "d", "--out", "o"), "--version"),
    ],
)
def test_numbers_and_names_out_of_range_are_usage_errors(
    config: Path, args: tuple[str, ...], words: str
) -> None:
    result = dicomai(config, *args, check=False)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and "database unavailable" not in result.stderr
    assert f"Invalid value for '{words}'" in result.stderr, result.stderr
