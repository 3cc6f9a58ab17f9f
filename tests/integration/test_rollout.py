"""Rolling a model out and back through the CLI, with jobs run as a worker runs them."""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time

import pytest
from rollout_site import DEMO, NAME, Site, demo_site, package
from servers import wait_for
from sqlalchemy import select, text
from sqlalchemy.exc import NoResultFound

from dicomai.audit import Action, Operator, record
from dicomai.db.models import Instance, Job, JobState, ModelState, ModelVersion, Prediction, Study
from dicomai.inference.types import ImagePrediction
from dicomai.jobs.applicability import applies
from dicomai.jobs.assembler import complete_quiet_studies, input_digest
from dicomai.jobs.claims import claim_job
from dicomai.rollout import deployment, registry
from dicomai.rollout.canary import canary_selects, sends_results
from dicomai.rollout.deployment import activate


@pytest.fixture
def site(tmp_path):
    site = demo_site(tmp_path)
    yield site
    site.close()


def one_line_error(result, *words: str) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, f"exit {result.returncode}: {result.stderr}"
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def delivered(site: Site, version: str) -> set[str]:
    """Study UIDs for which `version` created deliveries."""
    return {j.study.study_uid for j in site.jobs(version) for o in j.outputs if o.deliveries}


def test_corrupted_weights_are_refused_at_register_and_fail_the_job_at_load(tmp_path) -> None:
    site = Site(tmp_path)
    bad = package(tmp_path, "1.0.1")
    weights = bad / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    one_line_error(site.cli("models", "register", str(bad), check=False), "SHA-256 mismatch")
    assert "1.0.1" not in site.cli("models", "list").stdout

    site.register(DEMO)
    site.cli("models", "activate", NAME, "1.0.0")
    copy = site.settings.registry_dir / NAME / "1.0.0" / "weights.safetensors"
    copy.write_bytes(copy.read_bytes()[:-1] + b"\x00")
    site.ingest_studies(1)
    (job_id,) = site.run_jobs()
    (job,) = site.jobs("1.0.0")
    assert job.state == JobState.FAILED and "SHA-256 mismatch" in (job.error or ""), job.error
    shown = site.cli("jobs", "show", str(job_id)).stdout
    assert "failed" in shown and "SHA-256 mismatch" in shown, shown
    site.close()


def test_shadow_stores_predictions_sends_nothing_and_compares(site: Site, tmp_path) -> None:
    site.register(package(tmp_path, "1.1.0"))
    site.cli("models", "shadow", NAME, "1.1.0", "--reason", "try on live studies")
    studies = site.ingest_studies(4)
    site.run_jobs()

    shadow_jobs = site.jobs("1.1.0")
    assert [j.state for j in shadow_jobs] == [JobState.DONE] * 4
    assert all(j.outputs for j in shadow_jobs), "shadow results were not stored"
    assert delivered(site, "1.1.0") == set(), "a shadow version sent results"
    assert delivered(site, "1.0.0") == set(studies)
    with site.sessions() as session:
        shadow_predictions = session.scalars(
            select(Prediction).where(Prediction.job_id.in_([j.id for j in shadow_jobs]))
        ).all()
        assert len(shadow_predictions) == 4
    sent = sorted(p.name for p in site.delivered.iterdir())
    active_outputs = {o.sop_instance_uid for j in site.jobs("1.0.0") for o in j.outputs}
    assert {name.removesuffix(".dcm") for name in sent} <= active_outputs | set(sent)
    assert len(sent) == len(active_outputs)

    compared = site.cli("models", "compare", NAME, "1.0.0", "1.1.0").stdout
    assert "shared images:" in compared and " 4" in compared.splitlines()[0], compared
    assert "100%" in compared, compared  # same weights: the same calls


def test_canary_sends_for_the_studies_its_percentage_selects(site: Site, tmp_path) -> None:
    site.register(package(tmp_path, "1.2.0"))
    site.cli("models", "canary", NAME, "1.2.0", "--percent", "50", "--reason", "half")
    assert "canary (50 %)" in site.cli("models", "list").stdout
    studies = site.ingest_studies(8)
    site.run_jobs()

    expected = {uid for uid in studies if canary_selects(uid, 50)}
    assert 0 < len(expected) < len(studies), "pick a seed with studies on both sides"
    assert delivered(site, "1.2.0") == expected
    assert all(j.outputs for j in site.jobs("1.2.0")), "unselected canary results not stored"
    # One report per study: the active version is silent where the canary speaks.
    assert delivered(site, "1.0.0") == set(studies) - expected
    assert all(j.outputs for j in site.jobs("1.0.0")), "active results not stored"


def test_rollback_restores_the_previous_version_for_the_next_job(site: Site, tmp_path) -> None:
    site.register(package(tmp_path, "2.0.0"))
    site.cli("models", "activate", NAME, "2.0.0", "--reason", "better")
    site.ingest_studies(1, seed=1)
    site.run_jobs()
    assert [j.state for j in site.jobs("2.0.0")] == [JobState.DONE]

    out = site.cli("models", "rollback", NAME, "--reason", "radiologists complained").stdout
    assert "1.0.0 is active again" in out and "2.0.0 is retired" in out, out
    site.ingest_studies(1, seed=2)
    site.run_jobs()  # the same runner: no worker restart
    assert len(site.jobs("2.0.0")) == 1, "the rolled-back version ran again"
    assert len(site.jobs("1.0.0")) == 1 and site.jobs("1.0.0")[0].state == JobState.DONE
    with site.sessions() as session:
        states = dict(session.execute(select(ModelVersion.version, ModelVersion.state)).all())
    assert states == {"1.0.0": ModelState.ACTIVE, "2.0.0": ModelState.RETIRED}
    rows = site.cli("audit", "list", "--action", "model.rolled_back", "--json").stdout
    event = json.loads(rows.splitlines()[0])
    assert event["detail"]["reason"] == "radiologists complained"
    assert "rollback" in event["detail"]["command"] and event["actor"]
    one_line_error(
        site.cli("models", "activate", NAME, "2.0.0", check=False), "retired", "rollback"
    )


def run_every_queued_job(site: Site) -> None:
    """As a worker would, including the tasks of jobs cancelled since they were rung."""
    for version in ("1.0.0", "1.2.0", "2.0.0"):
        try:
            jobs = site.jobs(version)
        except NoResultFound:  # a version this test did not register
            continue
        for job in jobs:
            site.runner.run_job(job.id)


def test_a_rollback_cancels_the_queued_jobs_of_the_retired_version_and_queues_the_restored(
    site: Site, tmp_path
) -> None:
    site.register(package(tmp_path, "2.0.0"))
    site.cli("models", "activate", NAME, "2.0.0", "--reason", "better")
    studies = site.ingest_studies(2, seed=3)
    assert len(complete_quiet_studies(site.sessions, 0)) == 2  # queued; no worker ran yet

    out = site.cli("models", "rollback", NAME, "--reason", "wrong calls").stdout
    assert f"2 queued job(s) of {NAME} 2.0.0 cancelled" in out, out
    assert f"2 of its studies queued for {NAME} 1.0.0" in out, out
    run_every_queued_job(site)

    assert [j.state for j in site.jobs("2.0.0")] == [JobState.CANCELLED] * 2
    assert not any(j.outputs for j in site.jobs("2.0.0")), "the retired version ran"
    assert [j.state for j in site.jobs("1.0.0")] == [JobState.DONE] * 2
    assert delivered(site, "1.0.0") == set(studies)
    rows = site.cli("audit", "list", "--action", "job.cancelled", "--json").stdout.splitlines()
    assert len(rows) == 2 and "retired" in json.loads(rows[0])["detail"]["reason"]


def test_a_retired_shadow_runs_none_of_its_queued_jobs(site: Site, tmp_path) -> None:
    site.register(package(tmp_path, "1.2.0"))
    site.cli("models", "shadow", NAME, "1.2.0", "--reason", "try")
    studies = site.ingest_studies(1, seed=4)
    assert len(complete_quiet_studies(site.sessions, 0)) == 2  # the active's and the shadow's

    out = site.cli("models", "retire", NAME, "1.2.0", "--reason", "done trying").stdout
    assert f"1 queued job(s) of {NAME} 1.2.0 cancelled" in out and "queued for" not in out
    run_every_queued_job(site)

    assert [j.state for j in site.jobs("1.2.0")] == [JobState.CANCELLED]
    assert not site.jobs("1.2.0")[0].outputs
    assert delivered(site, "1.0.0") == set(studies)


def test_activating_a_shadow_that_ran_first_sends_its_report_for_the_studies_handed_over(
    site: Site, tmp_path
) -> None:
    site.register(package(tmp_path, "1.2.0"))
    site.cli("models", "shadow", NAME, "1.2.0", "--reason", "try")
    studies = site.ingest_studies(1, seed=6)
    complete_quiet_studies(site.sessions, 0)
    [shadow_job] = site.jobs("1.2.0")
    site.runner.run_job(shadow_job.id)  # the shadow ran first: stored, sent nothing
    assert delivered(site, "1.2.0") == set()

    out = site.cli("models", "activate", NAME, "1.2.0", "--reason", "better").stdout
    assert f"1 queued job(s) of {NAME} 1.0.0 cancelled" in out, out
    assert f"1 of its studies queued for {NAME} 1.2.0" in out, out
    run_every_queued_job(site)

    assert [j.state for j in site.jobs("1.0.0")] == [JobState.CANCELLED]
    assert delivered(site, "1.2.0") == set(studies), "the study got no report"


def test_a_version_retired_after_its_sr_went_out_keeps_the_report_and_gets_no_second(
    site: Site, tmp_path
) -> None:
    site.register(package(tmp_path, "1.2.0"))
    site.cli("models", "shadow", NAME, "1.2.0", "--reason", "try")
    studies = site.ingest_studies(1, seed=7)
    complete_quiet_studies(site.sessions, 0)
    [shadow_job] = site.jobs("1.2.0")
    site.runner.run_job(shadow_job.id)  # the shadow ran first: silent
    [active_job] = site.jobs("1.0.0")
    real = site.runner._conclude

    def activate_meanwhile(report):  # the active job's SR is sent; its overlays are next
        site.cli("models", "activate", NAME, "1.2.0", "--reason", "better")
        return real(report)

    site.runner._conclude = activate_meanwhile  # type: ignore[method-assign]
    site.runner.run_job(active_job.id)
    site.runner._conclude = real  # type: ignore[method-assign]
    run_every_queued_job(site)

    assert delivered(site, "1.0.0") == set(studies)
    assert delivered(site, "1.2.0") == set(), "two reports from one model for the study"
    # The overlays followed the SR that had gone out.
    [job] = site.jobs("1.0.0")
    assert all(o.deliveries for o in job.outputs), "overlays of a sent report were not sent"


def test_a_job_whose_version_was_retired_after_it_was_queued_is_cancelled_when_claimed(
    site: Site,
) -> None:
    site.ingest_studies(1, seed=5)
    [job_id] = complete_quiet_studies(site.sessions, 0)
    # As if the retirement committed between the job's creation and its hand-over.
    with site.sessions() as session, session.begin():
        version = session.get_one(ModelVersion, site.version_id("1.0.0"))
        version.state = ModelState.RETIRED
        assert not sends_results(session, version, "1.2.3")
    site.runner.run_job(job_id)

    [job] = site.jobs("1.0.0")
    assert job.state == JobState.CANCELLED and not job.outputs
    assert "retired" in (job.error or "")


def test_the_gate_refuses_a_worse_version_unless_forced_with_a_reason(site: Site, tmp_path) -> None:
    site.register(package(tmp_path, "3.0.0", test_accuracy=0.9))
    message = one_line_error(
        site.cli("models", "activate", NAME, "3.0.0", check=False), "worse", "test_accuracy"
    )
    assert "--force" in message
    one_line_error(site.cli("models", "activate", NAME, "3.0.0", "--force", check=False), "reason")
    assert "1.0.0" in site.cli("models", "show", NAME).stdout.splitlines()[0]

    reason = "site evaluation is better"
    site.cli("models", "activate", NAME, "3.0.0", "--force", "--reason", reason)
    rows = site.cli("audit", "list", "--action", "model.gate_overridden", "--json").stdout
    event = json.loads(rows.splitlines()[0])
    assert event["detail"]["reason"] == reason
    assert event["detail"]["gate"]["metrics"]["test_accuracy"] == [0.9, 0.9975]
    shown = site.cli("models", "show", NAME).stdout
    assert "active" in shown and "3.0.0" in shown and "model.gate_overridden" in shown


def test_a_site_evaluation_decides_the_gate_when_both_versions_have_one(site, tmp_path) -> None:
    site.register(package(tmp_path, "3.1.0"))
    for version, auc in (("1.0.0", 0.91), ("3.1.0", 0.85)):
        path = tmp_path / f"eval-{version}.json"
        path.write_text(json.dumps({"reference_set": "site-2026", "metrics": {"auc": auc}}))
        site.cli("models", "evaluation", NAME, version, str(path))
    one_line_error(site.cli("models", "activate", NAME, "3.1.0", check=False), "site evaluation")


def test_an_evaluation_of_another_model_is_refused(site: Site, tmp_path) -> None:
    # The demo's evaluation.json, recorded for another version, passed that version's gate.
    site.register(package(tmp_path, "3.3.0"))
    path = tmp_path / "evaluation.json"
    other = {"name": NAME, "version": "1.0.0", "weights_sha256": "0" * 64}
    path.write_text(json.dumps({"model": other, "auc_macro": 0.987654, "n": 60}))
    message = one_line_error(
        site.cli("models", "evaluation", NAME, "3.3.0", str(path), check=False), "not of"
    )
    assert "3.3.0" in message
    shown = site.cli("models", "show", NAME).stdout
    assert "0.987654" not in shown, "the refused evaluation was kept"


def test_the_gate_compares_the_macro_metrics_that_dicomai_evaluate_writes(
    site: Site, tmp_path
) -> None:
    # evaluation.json names them auc_macro, f1_macro, precision_weighted ...: equal accuracy,
    # but an AUC 0.165 worse must not pass.
    site.register(package(tmp_path, "3.2.0"))
    for version, auc in (("1.0.0", 0.561), ("3.2.0", 0.396)):
        path = tmp_path / f"evaluate-{version}.json"
        metrics = {"accuracy": 0.9, "auc_macro": auc, "f1_macro": 0.8, "brier": 0.2, "n": 60}
        path.write_text(json.dumps({"task": "binary", **metrics}))
        site.cli("models", "evaluation", NAME, version, str(path))
    message = one_line_error(site.cli("models", "activate", NAME, "3.2.0", check=False), "worse")
    assert "auc_macro" in message and "accuracy" not in message.split("worse")[1], message


def test_invalid_transitions_are_one_line_errors(site: Site, tmp_path) -> None:
    one_line_error(site.cli("models", "rollback", NAME, check=False), "no earlier active")
    one_line_error(site.cli("models", "activate", NAME, "1.0.0", check=False), "already active")
    one_line_error(site.cli("models", "shadow", NAME, "1.0.0", check=False), "active")
    one_line_error(site.cli("models", "shadow", NAME, "9.9.9", check=False), "not registered")
    site.register(package(tmp_path, "1.3.0"))
    one_line_error(
        site.cli("models", "canary", NAME, "1.3.0", "--percent", "0", check=False), "percent"
    )
    site.cli("models", "retire", NAME, "1.3.0", "--reason", "not needed")
    one_line_error(site.cli("models", "shadow", NAME, "1.3.0", check=False), "retired")
    # Retiring the active version would leave the model without one, beyond rollback's reach.
    one_line_error(
        site.cli("models", "retire", NAME, "1.0.0", check=False), "active version", "--force"
    )
    one_line_error(site.cli("models", "retire", NAME, "1.0.0", "--force", check=False), "reason")
    with site.sessions() as session:
        assert session.get_one(ModelVersion, site.version_id("1.0.0")).state == ModelState.ACTIVE


def test_view_position_and_series_description_route_images() -> None:
    manifest = json.loads(json.dumps(_demo_manifest()))
    manifest["applies_to"]["view_positions"] = ["PA"]
    manifest["applies_to"]["series_description"] = r"chest\s+pa"

    def image(view: str, description: str) -> Instance:
        return Instance(
            modality="DX", sop_class_uid="1.2", view_position=view, series_description=description
        )

    pa, lateral, other = image("PA", "CHEST  PA"), image("LL", "Chest PA"), image("PA", "Abdomen")
    assert applies(manifest, pa)
    assert not applies(manifest, lateral)
    assert not applies(manifest, other)


def _demo_manifest() -> dict:
    import tomllib

    return tomllib.loads((DEMO / "model.toml").read_text())


def test_an_activation_racing_the_assembler_on_postgresql_neither_fails_nor_doubles_a_job(
    tmp_path, postgres_url: str
) -> None:
    """The assembler is completing a study (its row locked; the successor's job and audit
    row to come) when an activation hands the same study over to that successor: neither may
    fail (deadlocked on the study's, the versions' or the audit chain's lock, or on the unique
    job key), and the study gets one job of the successor."""
    site = Site(tmp_path, postgres_url)
    try:
        site.register(DEMO)
        site.cli("models", "activate", NAME, "1.0.0", "--reason", "first model")
        site.register(package(tmp_path, "2.0.0"))
        site.ingest_studies(1, seed=5)
        assert len(complete_quiet_studies(site.sessions, 0)) == 1  # 1.0.0's job, queued

        assembler = site.sessions()
        assembler.begin()
        study = assembler.scalars(select(Study).with_for_update()).one()
        outcome: list[BaseException | None] = []

        def activate_successor() -> None:
            try:
                with site.sessions() as session, session.begin():
                    activate(session, NAME, "2.0.0", Operator("tester", "test", "race"))
                outcome.append(None)
            except BaseException as exc:
                outcome.append(exc)

        admin = threading.Thread(target=activate_successor)
        admin.start()
        try:
            wait_for(lambda: waiting_on_a_lock(site) or outcome, 30, "the activation to wait")
            # What the assembler does next for a version it read as running (see
            # `dicomai.jobs.assembler.create_job`).
            successor = assembler.scalars(
                select(ModelVersion).where(ModelVersion.version == "2.0.0")
            ).one()
            job = Job(
                study_id=study.id,
                model_version_id=successor.id,
                input_digest=input_digest(study.instances),
            )
            assembler.add(job)
            assembler.flush()
            record(
                assembler,
                Action.JOB_CREATED,
                actor="assembler",
                object_type="job",
                object_id=job.id,
            )
            assembler.commit()
        finally:
            assembler.close()
            admin.join(60)
        assert outcome == [None], outcome
        assert [j.state for j in site.jobs("2.0.0")] == [JobState.QUEUED]
        assert [j.state for j in site.jobs("1.0.0")] == [JobState.CANCELLED]
    finally:
        site.close()


def waiting_on_a_lock(site: Site) -> bool:
    with site.engine.connect() as connection:
        return bool(
            connection.scalar(
                text(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND wait_event_type = 'Lock'"
                )
            )
        )


def test_two_activations_at_once_on_sqlite_leave_one_active_version(
    site: Site, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site.register(package(tmp_path, "1.1.0"))
    site.register(package(tmp_path, "1.2.0"))
    gate = deployment.decide

    def slow_gate(*args, **kwargs):  # both admins read the versions before either writes
        time.sleep(0.5)
        return gate(*args, **kwargs)

    monkeypatch.setattr(deployment, "decide", slow_gate)
    errors: list[BaseException] = []

    def activate_version(version: str) -> None:
        try:
            with site.sessions() as session, session.begin():
                activate(session, NAME, version, Operator("admin", "test", version))
        except BaseException as exc:
            errors.append(exc)

    admins = [threading.Thread(target=activate_version, args=(v,)) for v in ("1.1.0", "1.2.0")]
    for admin in admins:
        admin.start()
    for admin in admins:
        admin.join(60)
    assert errors == []
    with site.sessions() as session:
        active = session.scalars(
            select(ModelVersion.version).where(ModelVersion.state == ModelState.ACTIVE)
        ).all()
    assert len(active) == 1, active


def test_two_registrations_of_one_version_at_once_leave_the_winners_files(
    site: Site, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loser of the race must not replace the winner's registry folder under the
    winner's row: the worker runs whatever the folder holds."""
    packages = []
    for letter in "AB":
        folder = package(tmp_path / letter, "2.0.0")
        text = (folder / "model.toml").read_text()
        (folder / "model.toml").write_text(
            re.sub(r"(?m)^description = .*$", f'description = "package {letter}"', text, count=1)
        )
        packages.append(folder)
    find, copy = registry.find, registry._staged_copy
    both_looked = threading.Barrier(2, timeout=30)

    def find_together(*args):  # neither has recorded the version when both look for it
        found = find(*args)
        both_looked.wait()
        return found

    def late_copy(folder, target):  # and B copies after A is done
        if "package B" in (folder / "model.toml").read_text():
            time.sleep(1.0)
        return copy(folder, target)

    monkeypatch.setattr(registry, "find", find_together)
    monkeypatch.setattr(registry, "_staged_copy", late_copy)
    outcomes: dict[str, BaseException | None] = {}

    def register_package(folder) -> None:
        try:
            with site.sessions() as session, session.begin():
                registry.register(session, folder, site.settings.registry_dir, Operator("a"))
            outcomes[folder.parent.name] = None
        except BaseException as exc:
            outcomes[folder.parent.name] = exc

    admins = [threading.Thread(target=register_package, args=(p,)) for p in packages]
    for admin in admins:
        admin.start()
    for admin in admins:
        admin.join(60)
    winners = [letter for letter, error in outcomes.items() if error is None]
    assert len(winners) == 1, outcomes
    (loser,) = [error for error in outcomes.values() if error is not None]
    assert "already registered" in str(loser)
    with site.sessions() as session:
        row = session.get_one(ModelVersion, site.version_id("2.0.0"))
        recorded = row.manifest["description"]
    stored = (site.settings.registry_dir / NAME / "2.0.0" / "model.toml").read_text()
    assert recorded == f"package {winners[0]}"
    assert f'description = "package {winners[0]}"' in stored


def test_an_activation_while_a_worker_saves_its_report_on_postgresql_fails_neither(
    tmp_path, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The activation holds the versions and will lock the running jobs; the worker saving
    the retired version's report inserted rows referencing its job first, then asked for the
    version: a deadlock, one of the two failing."""
    site = Site(tmp_path, postgres_url)
    try:
        site.register(DEMO)
        site.cli("models", "activate", NAME, "1.0.0", "--reason", "first model")
        site.register(package(tmp_path, "2.0.0"))
        site.ingest_studies(1, seed=5)
        (job_id,) = complete_quiet_studies(site.sessions, 0)
        with site.sessions() as session, session.begin():
            claim = claim_job(session, job_id, 600)
        assert claim is not None
        report = [ImagePrediction(claim.instances[0][0], evaluated=False, reason="test")]

        holding, in_state = threading.Event(), deployment._in_state

        def held(*args, **kwargs):  # the versions are locked: let the worker go, then wait
            found = in_state(*args, **kwargs)
            holding.set()
            time.sleep(1.0)
            return found

        monkeypatch.setattr(deployment, "_in_state", held)
        outcome: dict[str, BaseException | None] = {}

        def activate_successor() -> None:
            try:
                with site.sessions() as session, session.begin():
                    activate(session, NAME, "2.0.0", Operator("admin", "test", "race"))
                outcome["admin"] = None
            except BaseException as exc:
                outcome["admin"] = exc

        admin = threading.Thread(target=activate_successor)
        admin.start()
        assert holding.wait(30)
        try:
            site.runner._record_report(claim, report, [])
            outcome["worker"] = None
        except BaseException as exc:
            outcome["worker"] = exc
        admin.join(60)
        assert outcome == {"admin": None, "worker": None}, outcome
    finally:
        site.close()


def test_a_registry_folder_changed_under_its_row_is_not_run(site: Site) -> None:
    """Weights and manifest replaced together (they agree with each other, not with what was
    registered): the worker must not run them under the registered label."""
    folder = site.settings.registry_dir / NAME / "1.0.0"
    weights = folder / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01  # the last weight's last byte: still a valid file
    weights.write_bytes(bytes(data))
    manifest = folder / "model.toml"
    digest = hashlib.sha256(bytes(data)).hexdigest()
    manifest.write_text(
        re.sub(r'(?m)^weights_sha256 = ".*"$', f'weights_sha256 = "{digest}"', manifest.read_text())
    )
    site.ingest_studies(1)
    site.run_jobs()
    (job,) = site.jobs("1.0.0")
    assert job.state == JobState.FAILED, job.state
    assert "not the registered" in (job.error or ""), job.error


def test_a_registry_manifest_edited_by_hand_is_not_run(site: Site) -> None:
    # A threshold set to 0 in the registry's model.toml flagged every image, under the
    # registered label, while `models show` showed the registered threshold.
    manifest = site.settings.registry_dir / NAME / "1.0.0" / "model.toml"
    text, count = re.subn(r"(?m)^threshold = .*$", "threshold = 0.0", manifest.read_text())
    assert count, "the demo manifest has no threshold to edit"
    manifest.write_text(text)
    site.ingest_studies(1)
    site.run_jobs()
    (job,) = site.jobs("1.0.0")
    assert job.state == JobState.FAILED, job.state
    assert "differs from the registered manifest (classes)" in (job.error or ""), job.error
