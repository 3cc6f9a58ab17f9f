"""State changes while a study's jobs are in flight: each study still gets one report per model.

Which version sends is decided when its job finishes, so a change between a study's jobs
(a canary's share lowered or raised, a canary made shadow, a shadow made canary or active)
must neither leave the study without a report nor give it two.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
from rollout_site import DEMO, NAME, Site, demo_site, package
from sqlalchemy import select
from test_rollout import one_line_error

import dicomai.jobs.runner as runner_module
from dicomai.db.models import Delivery, Job, JobState, ModelVersion, OutputObject, Study
from dicomai.errors import ModelPackageError
from dicomai.jobs.assembler import complete_quiet_studies
from dicomai.rollout.canary import canary_selects

NEW = "2.0.0"
STUDIES = 4  # seed 1: a canary at 50 % selects some of them and not others


@pytest.fixture
def site(tmp_path):
    site = demo_site(tmp_path)
    site.register(package(tmp_path, NEW))
    yield site
    site.close()


def models(site: Site, *args: str) -> str:
    return site.cli("models", *args, "--reason", "test").stdout


def reports(site: Site) -> Counter[str]:
    """How many SRs of the model each study was given to the destinations, by study UID."""
    with site.sessions() as session:
        uids = session.scalars(
            select(Study.study_uid)
            .select_from(Delivery)
            .join(OutputObject, Delivery.output_id == OutputObject.id)
            .join(Job, OutputObject.job_id == Job.id)
            .join(Study, Job.study_id == Study.id)
            .where(OutputObject.kind == "sr")
        ).all()
    return Counter(uids)


def queued(site: Site, version: str | None = None) -> list[int]:
    with site.sessions() as session:
        query = select(Job.id).join(ModelVersion).where(Job.state == JobState.QUEUED)
        if version is not None:
            query = query.where(ModelVersion.version == version)
        return list(session.scalars(query.order_by(Job.id)))


def run(site: Site, version: str | None = None) -> None:
    """Run the queued jobs (of `version`) until none is left, as workers would."""
    while ids := queued(site, version):
        for job_id in ids:
            site.runner.run_job(job_id)


def in_flight(site: Site) -> list[str]:
    """Studies completed with their jobs queued; their UIDs."""
    uids = site.ingest_studies(STUDIES, seed=1)
    complete_quiet_studies(site.sessions, 0)
    selected = [canary_selects(uid, 50) for uid in uids]
    assert any(selected) and not all(selected), "pick a seed with studies on both sides"
    return uids


def assert_one_report_each(site: Site, uids: list[str]) -> None:
    counted = reports(site)
    assert {uid: counted[uid] for uid in uids} == dict.fromkeys(uids, 1), counted


CANARY_ALL = ("canary", NAME, NEW, "--percent", "100")
CANARY_HALF = ("canary", NAME, NEW, "--percent", "50")
SHADOW = ("shadow", NAME, NEW)
ACTIVATE = ("activate", NAME, NEW)


@pytest.mark.parametrize("first", ["1.0.0", NEW])
@pytest.mark.parametrize(
    ("before", "after"),
    [
        pytest.param(CANARY_ALL, CANARY_HALF, id="lower"),
        pytest.param(CANARY_HALF, CANARY_ALL, id="raise"),
        pytest.param(CANARY_ALL, SHADOW, id="canary-to-shadow"),
        pytest.param(SHADOW, CANARY_ALL, id="shadow-to-canary"),
        pytest.param(SHADOW, ACTIVATE, id="shadow-to-active"),
        pytest.param(CANARY_HALF, ACTIVATE, id="canary-to-active"),
    ],
)
def test_a_change_between_a_studys_jobs_leaves_it_one_report(
    site: Site, before: tuple[str, ...], after: tuple[str, ...], first: str
) -> None:
    models(site, *before)
    uids = in_flight(site)
    run(site, first)  # one version ran (sending or silent); the other's jobs are queued
    models(site, *after)
    run(site)
    assert_one_report_each(site, uids)


def test_lowering_a_canary_queues_the_active_version_again_where_it_ran_silent(
    site: Site,
) -> None:
    models(site, *CANARY_ALL)
    uids = in_flight(site)
    run(site, "1.0.0")  # silent: the canary had every study
    assert reports(site) == Counter()

    out = models(site, *CANARY_HALF)
    given_back = [uid for uid in uids if not canary_selects(uid, 50)]
    assert f"{len(given_back)} studies in flight queued for {NAME} 1.0.0" in out, out
    rows = site.cli("audit", "list", "--action", "job.retried", "--json").stdout.splitlines()
    assert {json.loads(row)["study_uid"] for row in rows} == set(given_back)
    run(site)
    assert_one_report_each(site, uids)
    for uid, versions in _senders(site).items():
        assert versions == ([NEW] if canary_selects(uid, 50) else ["1.0.0"]), (uid, versions)


def test_a_canary_made_shadow_while_its_job_runs_leaves_the_study_its_report(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    models(site, *CANARY_ALL)
    uids = in_flight(site)
    run(site, "1.0.0")  # silent: the canary had every study
    job_id, *_ = queued(site, NEW)
    classify = runner_module.classify

    def shadow_meanwhile(*args, **kwargs):  # the canary's job is past its claim
        monkeypatch.setattr(runner_module, "classify", classify)
        models(site, *SHADOW)
        return classify(*args, **kwargs)

    monkeypatch.setattr(runner_module, "classify", shadow_meanwhile)
    site.runner.run_job(job_id)
    run(site)
    assert_one_report_each(site, uids)
    assert all(versions == ["1.0.0"] for versions in _senders(site).values())


def test_a_canary_job_that_fails_for_good_gives_the_study_back_to_the_active_version(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The active version ran silent (the canary had the study); the canary's job then
    # failed for good, and the study got no report at all.
    models(site, *CANARY_ALL)
    uids = in_flight(site)
    run(site, "1.0.0")
    assert reports(site) == Counter()

    def broken(*args, **kwargs):
        raise ModelPackageError("weights unreadable")

    monkeypatch.setattr(runner_module, "classify", broken)
    for job_id in queued(site, NEW):
        site.runner.run_job(job_id)
    monkeypatch.undo()
    assert len(queued(site, "1.0.0")) == len(uids), "the active version was not queued again"
    run(site)
    assert_one_report_each(site, uids)
    assert all(versions == ["1.0.0"] for versions in _senders(site).values())


def _senders(site: Site) -> dict[str, list[str]]:
    with site.sessions() as session:
        rows = session.execute(
            select(Study.study_uid, ModelVersion.version)
            .select_from(Delivery)
            .join(OutputObject, Delivery.output_id == OutputObject.id)
            .join(Job, OutputObject.job_id == Job.id)
            .join(Study, Job.study_id == Study.id)
            .join(ModelVersion, Job.model_version_id == ModelVersion.id)
            .where(OutputObject.kind == "sr")
        ).all()
    senders: dict[str, list[str]] = {}
    for uid, version in rows:
        senders.setdefault(uid, []).append(version)
    return senders


def test_without_destinations_a_change_does_not_run_the_reporting_version_again(
    tmp_path,
) -> None:
    # Whether a version had reported was read from its deliveries: with no destination
    # configured there are none, so each state change queued the active version's finished
    # jobs of every study in flight again, and a canary then reported beside it.
    site = demo_site(tmp_path, destinations=False)
    try:
        site.register(package(tmp_path, NEW))
        models(site, *SHADOW)
        uids = in_flight(site)
        run(site, "1.0.0")  # the active version reports; the shadow's jobs are queued
        out = models(site, *CANARY_HALF)
        assert "queued for" not in out, out
        assert queued(site, "1.0.0") == []
        assert site.cli("audit", "list", "--action", "job.retried", "--json").stdout == ""
        run(site)
        with site.sessions() as session:
            reported = session.execute(
                select(Study.study_uid, ModelVersion.version)
                .select_from(Job)
                .join(Study, Job.study_id == Study.id)
                .join(ModelVersion, Job.model_version_id == ModelVersion.id)
                .where(Job.reported)
            ).all()
        assert sorted(reported) == sorted((uid, "1.0.0") for uid in uids)
    finally:
        site.close()


def test_a_canary_share_too_small_to_select_a_study_is_refused(site: Site) -> None:
    result = site.cli("models", "canary", NAME, NEW, "--percent", "0.004", check=False)
    one_line_error(result, "--percent", "0.01")
    assert "canary" not in site.cli("models", "list").stdout
    assert "0.01 %" in models(site, "canary", NAME, NEW, "--percent", "0.01")


def _evaluate(site: Site, tmp_path, version: str, **metrics: float) -> None:
    path = tmp_path / f"evaluation-{version}.json"
    path.write_text(json.dumps({"reference_set": "site-2026", "metrics": metrics}))
    site.cli("models", "evaluation", NAME, version, str(path))


def test_a_bad_site_evaluation_of_the_candidate_is_not_outvoted_by_package_metrics(
    site: Site, tmp_path
) -> None:
    # The active version has no site evaluation; the packages' [metrics] are equal. The
    # site's accuracy (as dicomai evaluate names it) meets the package's test_accuracy.
    _evaluate(site, tmp_path, NEW, accuracy=0.3, auc_macro=0.41)
    message = one_line_error(site.cli("models", "activate", NAME, NEW, check=False), "worse")
    assert "accuracy 0.3 < test_accuracy 0.9975" in message, message

    # With nothing comparable (the package has val_auc, not val_auc_macro) it is refused.
    _evaluate(site, tmp_path, NEW, auc_macro=0.99)
    message = one_line_error(site.cli("models", "activate", NAME, NEW, check=False))
    assert "site evaluation" in message and "share no metric" in message, message

    # Where the names meet the active's package metrics, they are compared.
    _evaluate(site, tmp_path, NEW, test_accuracy=0.5)
    message = one_line_error(site.cli("models", "activate", NAME, NEW, check=False), "worse")
    assert "test_accuracy 0.5 < 0.9975" in message and "site evaluation of" in message, message

    _evaluate(site, tmp_path, NEW, test_accuracy=0.998)
    out = models(site, "activate", NAME, NEW)
    assert "gate passed" in out and "site evaluation of" in out and "package metrics" in out, out


def test_a_candidate_without_the_site_evaluation_the_active_version_has_is_refused(
    site: Site, tmp_path
) -> None:
    _evaluate(site, tmp_path, "1.0.0", accuracy=0.9)
    one_line_error(
        site.cli("models", "activate", NAME, NEW, check=False), "has none", "models evaluation"
    )
    _evaluate(site, tmp_path, NEW, accuracy=0.91)
    assert "(site evaluation)" in models(site, "activate", NAME, NEW)


def test_an_activation_says_which_evidence_the_gate_used(tmp_path) -> None:
    site = Site(tmp_path)
    site.register(DEMO)
    assert "no active version" in models(site, "activate", NAME, "1.0.0")
    site.register(package(tmp_path, NEW))
    assert "gate passed: not worse than" in models(site, "activate", NAME, NEW)
    site.close()
