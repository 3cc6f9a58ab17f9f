"""A worker's loaded models: those of versions taken out of service are dropped, memory freed."""

from __future__ import annotations

import gc
import json
import tomllib
import weakref
from pathlib import Path

import pytest
import torch
from daemon import REPO

import dicomai.jobs.runner as runner_module
from dicomai.config import load_settings
from dicomai.db.migrate import upgrade
from dicomai.db.models import ModelState, ModelVersion
from dicomai.db.session import make_engine, make_sessionmaker
from dicomai.inference.runner import Classifier
from dicomai.jobs.runner import JobRunner
from dicomai.models.package import load_model

DEMO = REPO / "models" / "demo-chest-nodule"


@pytest.fixture
def runner(tmp_path: Path) -> JobRunner:
    settings = load_settings(None, storage={"dir": tmp_path / "var"})
    upgrade(settings.database_url)
    return JobRunner(settings, make_sessionmaker(make_engine(settings.database_url)), "cpu")


def versions(runner: JobRunner, *states: ModelState) -> list[int]:
    """Rows of versions 1.0.0, 2.0.0, ... of one model in `states`; their ids."""
    with runner.sessions() as session, session.begin():
        rows = [
            ModelVersion(
                name="demo-chest-nodule",
                version=f"{n}.0.0",
                architecture="tiny_cnn",
                state=state,
                path=str(DEMO),
                weights_sha256="",
                manifest={},
            )
            for n, state in enumerate(states, start=1)
        ]
        session.add_all(rows)
        session.flush()
        return [row.id for row in rows]


def set_state(runner: JobRunner, version_id: int, state: ModelState) -> None:
    with runner.sessions() as session, session.begin():
        session.get_one(ModelVersion, version_id).state = state


def test_a_retired_version_is_unloaded_and_the_ones_in_service_are_kept(
    runner: JobRunner,
) -> None:
    old, canary, shadow = versions(runner, ModelState.ACTIVE, ModelState.CANARY, ModelState.SHADOW)
    for version_id in (old, canary, shadow):
        runner._classifiers[version_id] = Classifier(load_model(DEMO), device="cpu")
    kept = {i: runner._classifiers[i] for i in (canary, shadow)}
    network = weakref.ref(runner._classifiers[old].module)

    runner._drop_retired()  # nothing retired yet
    assert set(runner._classifiers) == {old, canary, shadow}

    set_state(runner, canary, ModelState.ACTIVE)  # the rollout: the old version retires
    set_state(runner, old, ModelState.RETIRED)
    runner._drop_retired()

    assert runner._classifiers == kept, "only the retired version's model should go"
    gc.collect()
    assert network() is None, "the retired model's network is still held in memory"


def test_unloading_a_model_from_a_gpu_gives_its_memory_back(
    runner: JobRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    (version_id,) = versions(runner, ModelState.CANARY)
    classifier = Classifier(load_model(DEMO), device="cpu")
    classifier.device = torch.device("cuda:0")  # as built on a GPU; no GPU is needed here
    runner._classifiers[version_id] = classifier
    del classifier
    emptied: list[bool] = []
    monkeypatch.setattr(runner_module.torch.cuda, "empty_cache", lambda: emptied.append(True))

    set_state(runner, version_id, ModelState.RETIRED)  # the canary was not kept
    runner._drop_retired()

    assert runner._classifiers == {}
    assert emptied == [True], "the CUDA cache keeps the freed blocks from other processes"


def test_a_worker_loads_the_versions_in_service_at_start_and_logs_one_it_cannot(
    runner: JobRunner, caplog: pytest.LogCaptureFixture
) -> None:
    # Loaded inside the first job, a worker's first study waited for the model and its
    # warm-up.
    registered = json.loads(json.dumps(tomllib.loads((DEMO / "model.toml").read_text())))
    active, retired, shadow, missing = versions(
        runner, ModelState.ACTIVE, ModelState.RETIRED, ModelState.SHADOW, ModelState.CANARY
    )
    with runner.sessions() as session, session.begin():
        for version_id in (active, retired, shadow):
            session.get_one(ModelVersion, version_id).manifest = registered
        session.get_one(ModelVersion, missing).path = str(DEMO.parent / "not-there")

    runner.load_models_in_service()

    assert set(runner._classifiers) == {active, shadow}
    assert "model demo-chest-nodule 4.0.0 not loaded at start" in caplog.text
