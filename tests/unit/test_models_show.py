"""`dicomai models show`, `list` and `evaluation`: what the registry tells an administrator about
how a registered version runs and how it was evaluated, and which evaluations it accepts."""

from __future__ import annotations

import copy
import json
import tomllib
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from daemon import REPO, write_config

from dicomai.cli import main as cli_main
from dicomai.cli import models as models_cli
from dicomai.config import load_settings
from dicomai.db.migrate import upgrade
from dicomai.db.models import ModelState, ModelVersion
from dicomai.db.session import make_engine, make_sessionmaker

DEMO = tomllib.loads((REPO / "models" / "demo-chest-nodule" / "model.toml").read_text())
FIRST, SECOND, OTHER = "a" * 64, "b" * 64, "c" * 64


def variant(name: str, version: str, **changes: Any) -> dict[str, Any]:
    """The demo's manifest as `name version`, first weights `FIRST`, with `changes` made."""
    data = copy.deepcopy(DEMO)
    data.update(name=name, version=version, weights_sha256=FIRST, **changes)
    return data


RGB_MC = variant(
    "skin",
    "2.0.0",
    temperature=1.2345,
    explanation="gradcam++",
    input={
        "size": [64, 48],
        "mean": [0.5, 0.4, 0.3],
        "std": [0.25, 0.2, 0.15],
        "equalize": "clahe",
        "clahe_clip": 3.0,
        "frames": "all",
        "window": "lung",
        "color": "rgb",
    },
    uncertainty={"method": "mc_dropout", "passes": 10, "seed": 7},
)
ENSEMBLE = variant(
    "ens",
    "1.0.0",
    uncertainty={"method": "ensemble", "passes": 20, "seed": 0},
    ensemble={"members": ["member1.safetensors"], "sha256": [SECOND]},
)


@pytest.fixture
def config(tmp_path: Path) -> Path:
    """A site whose registry holds the demo (`demo 1.0.0`, active), `RGB_MC` and `ENSEMBLE`."""
    path = write_config(tmp_path / "dicomai.toml", {"storage": {"dir": str(tmp_path / "var")}}, {})
    url = load_settings(path).database_url
    upgrade(url)
    engine = make_engine(url)
    with make_sessionmaker(engine)() as session, session.begin():
        for data, state in (
            (variant("demo", "1.0.0"), ModelState.ACTIVE),
            (RGB_MC, ModelState.REGISTERED),
            (ENSEMBLE, ModelState.REGISTERED),
        ):
            session.add(
                ModelVersion(
                    name=data["name"],
                    version=data["version"],
                    architecture=data["architecture"],
                    state=state,
                    path=f"{data['name']}/{data['version']}",
                    weights_sha256=data["weights_sha256"],
                    manifest=data,
                )
            )
    engine.dispose()
    return path


def run(config: Path, *args: str) -> Result:
    """`dicomai --config CONFIG ARGS...` in this process."""
    models_cli.register(cli_main.cli)
    result = CliRunner().invoke(cli_main.cli, ["--config", str(config), *args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


class Fields(dict[str, str]):
    """The ``name: value`` lines of a command's output, by name (the first of each name)."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text
        for line in text.splitlines():
            name, sep, value = line.partition(": ")
            if sep and not line.startswith(" "):
                self.setdefault(name.strip(), value.strip())

    def __missing__(self, name: str) -> str:
        raise AssertionError(f"no {name!r} line in the output:\n{self.text}")


def evaluation_of(data: dict[str, Any], method: str, samples: int, **model: Any) -> dict[str, Any]:
    """An evaluation.json as `dicomai evaluate` writes it for the package `data`."""
    block = {
        "name": data["name"],
        "version": data["version"],
        "architecture": data["architecture"],
        "weights_sha256": data["weights_sha256"],
        "temperature": data["temperature"],
        **model,
    }
    return {
        "model": block,
        "data": {"path": "/site/reference", "n": 60, "task": "binary"},
        "task": "binary",
        "n": 60,
        "accuracy": 0.5,
        "auc_macro": 0.8123,
        "sensitivity": 1.0,
        "specificity": 0.0,
        "per_class": {"nodule": {"auc": 0.8123, "threshold": 0.5}},
        "uncertainty": {"method": method, "samples": samples, "answers": 60, "errors": 30},
    }


def record(config: Path, tmp_path: Path, name: str, version: str, evaluation: dict) -> Result:
    path = tmp_path / f"evaluation-{name}-{version}.json"
    path.write_text(json.dumps(evaluation))
    return run(config, "models", "evaluation", name, version, str(path))


def recorded(config: Path, tmp_path: Path, name: str, version: str, evaluation: dict) -> None:
    result = record(config, tmp_path, name, version, evaluation)
    assert result.exit_code == 0, f"the evaluation was refused: {result.output}"


def test_show_says_how_the_daemon_runs_the_model_and_labels_both_evaluations(
    config: Path, tmp_path: Path
) -> None:
    recorded(config, tmp_path, "skin", "2.0.0", evaluation_of(RGB_MC, "mc_dropout", 10))
    result = run(config, "models", "show", "skin", "2.0.0")
    assert result.exit_code == 0, result.output
    shown = Fields(result.stdout)
    assert shown["temperature"].startswith("1.2345"), result.stdout
    assert shown["input size"].startswith("64 x 48"), result.stdout
    assert shown["colour"] == "rgb"
    assert shown["window"] == "lung: center -600, width 1500"
    assert shown["frames"] == "all"
    assert shown["equalisation"] == "clahe (clip 3)"
    assert shown["normalisation"] == "mean 0.5 0.4 0.3, std 0.25 0.2 0.15"
    assert shown["uncertainty"].startswith("MC dropout, 10 passes (seed 7)"), result.stdout
    assert shown["heat maps"] == "gradcam++"
    classes = [line.split() for line in result.stdout.splitlines() if line.startswith("nodule ")]
    assert classes and classes[0][-2:] == ["0.5", "yes"], result.stdout
    package, _, site = result.stdout.partition("site evaluation (")
    assert "package metrics (model.toml [metrics]" in package, result.stdout
    assert "val_auc:" in package and "0.8123" not in package, result.stdout
    assert "the rollout gate prefers it" in site and "auc_macro:" in site and "0.8123" in site
    assert "val_auc" not in site, result.stdout


def test_show_of_a_package_without_settings_gives_the_daemons_defaults(config: Path) -> None:
    result = run(config, "models", "show", "demo")
    shown = Fields(result.stdout)
    assert shown["input size"].startswith("128 x 128"), result.stdout
    assert shown["colour"] == "grey" and shown["window"].startswith("stored")
    assert shown["temperature"].startswith("0.3267")
    assert shown["uncertainty"] == "none (one pass)"
    assert shown["heat maps"].startswith("the architecture's own")
    assert "site evaluation: none recorded" in result.stdout


def test_show_of_an_ensemble_names_its_members(config: Path) -> None:
    shown = Fields(run(config, "models", "show", "ens", "1.0.0").stdout)
    assert shown["uncertainty"].startswith(
        "ensemble of 2 members (weights.safetensors, member1.safetensors)"
    ), shown


def test_list_shows_the_site_evaluation_where_recorded_else_the_validation_metrics(
    config: Path, tmp_path: Path
) -> None:
    recorded(config, tmp_path, "skin", "2.0.0", evaluation_of(RGB_MC, "mc_dropout", 10))
    rows = {line.split()[0]: line for line in run(config, "models", "list").stdout.splitlines()}
    assert "site evaluation: auc_macro=0.8123 accuracy=0.5" in rows["skin"], rows["skin"]
    assert "validation: auc=1 accuracy=0.9875" in rows["demo"], rows["demo"]


def one_line_error(result: Result, *words: str) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.exit_code == 2, f"exit {result.exit_code}: {result.output}"
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def test_an_ensembles_evaluation_is_refused_for_the_model_that_is_its_first_member(
    config: Path, tmp_path: Path
) -> None:
    # The ensemble was written as demo 1.0.0, with demo's weights as its first member.
    ensemble = evaluation_of(variant("demo", "1.0.0"), "ensemble", 2)
    one_line_error(record(config, tmp_path, "demo", "1.0.0", ensemble), "uncertainty", "ensemble")
    assert "site evaluation: none recorded" in run(config, "models", "show", "demo").stdout

    members = evaluation_of(variant("demo", "1.0.0"), "none", 1, ensemble_sha256=[SECOND])
    one_line_error(record(config, tmp_path, "demo", "1.0.0", members), "ensemble members")


def test_an_evaluation_of_an_ensemble_with_another_member_is_refused(
    config: Path, tmp_path: Path
) -> None:
    other = evaluation_of(ENSEMBLE, "ensemble", 2, ensemble_sha256=[OTHER])
    one_line_error(record(config, tmp_path, "ens", "1.0.0", other), "member 2", OTHER[:12])

    own = evaluation_of(ENSEMBLE, "ensemble", 2, ensemble_sha256=[SECOND])
    recorded(config, tmp_path, "ens", "1.0.0", own)
    assert "site evaluation: auc_macro=0.8123" in run(config, "models", "list").stdout


def test_an_evaluation_at_another_temperature_is_refused(config: Path, tmp_path: Path) -> None:
    hotter = evaluation_of(RGB_MC, "mc_dropout", 10, temperature=2.0)
    one_line_error(record(config, tmp_path, "skin", "2.0.0", hotter), "temperature")
