"""Day-to-day operations from the CLI: jobs, studies, deliveries and the audit trail."""

from __future__ import annotations

import json
from datetime import timedelta

import pydicom
import pytest
from recording import record_dataset
from rollout_site import NAME, Site, demo_site
from servers import sample_file
from sqlalchemy import func, select, update

from dicomai.db.models import (
    Delivery,
    DeliveryState,
    Job,
    JobState,
    OutputObject,
    Study,
    utcnow,
)
from dicomai.ingest.spool import Spool
from dicomai.jobs.assembler import complete_quiet_studies


@pytest.fixture
def site(tmp_path):
    site = demo_site(tmp_path)
    yield site
    site.close()


def test_jobs_studies_deliveries_and_audit(site: Site) -> None:
    first, second = site.ingest_studies(2)
    done_id, failed_id = site.run_jobs()
    with site.sessions() as session, session.begin():
        session.execute(
            update(Job).where(Job.id == failed_id).values(state=JobState.FAILED, error="boom")
        )
        session.execute(update(Delivery).values(state=DeliveryState.FAILED, last_error="refused"))

    listed = [json.loads(line) for line in site.cli("jobs", "list", "--json").stdout.splitlines()]
    assert {j["id"]: j["state"] for j in listed} == {done_id: "done", failed_id: "failed"}
    assert "failed" in site.cli("jobs", "list", "--state", "failed").stdout

    site.cli("jobs", "retry", str(failed_id), "--reason", "transient GPU error")
    with site.sessions() as session:
        assert session.get_one(Job, failed_id).state == JobState.QUEUED
    site.cli("jobs", "cancel", str(failed_id), "--reason", "study sent by mistake")
    refused = site.cli("jobs", "cancel", str(failed_id), check=False)
    assert refused.returncode == 2 and "only queued jobs" in refused.stderr
    assert site.cli("jobs", "show", "999", check=False).stderr.strip() == (
        "error: job 999 does not exist"
    )

    shown = site.cli("studies", "show", first).stdout
    assert "jobs:" in shown and f"{NAME} 1.0.0" in shown and "instance.stored" in shown, shown

    deliveries = site.cli("deliveries", "list", "--state", "failed", "--json").stdout.splitlines()
    assert deliveries, "no failed delivery listed"
    delivery_id = json.loads(deliveries[0])["id"]
    site.cli("deliveries", "retry", str(delivery_id), "--reason", "PACS is back")
    with site.sessions() as session:
        assert session.get_one(Delivery, delivery_id).state == DeliveryState.PENDING

    admin = site.cli("audit", "list", "--since", "1h", "--actor", _user(), "--json").stdout
    actions = [json.loads(line)["action"] for line in admin.splitlines()]
    assert actions == ["delivery.retried", "job.cancelled", "job.retried", "model.activated"]
    reasons = [json.loads(line)["detail"]["reason"] for line in admin.splitlines()]
    assert reasons[0] == "PACS is back"
    for_study = site.cli("audit", "list", "--study", second, "--action", "job.retried").stdout
    assert "job.retried" in for_study and "transient GPU error" in for_study
    future = site.cli("audit", "list", "--since", "2999-01-01", "--json").stdout
    assert future == ""
    assert site.cli("audit", "list", "--since", "yesterday", check=False).returncode == 2
    assert "audit chain intact" in site.cli("audit", "verify").stdout


def _user() -> str:
    from dicomai.audit import os_user

    return os_user()


def test_health_fails_when_jobs_wait_for_a_worker_past_the_lease(site: Site) -> None:
    site.ingest_studies(2)
    first, _ = complete_quiet_studies(site.sessions, 0)  # queued jobs, no worker in this site
    fresh = site.cli("health", check=False).stdout
    assert _line(fresh, "worker").split()[1] == "ok", fresh
    with site.sessions() as session, session.begin():
        session.execute(update(Job).values(created_at=utcnow() - timedelta(hours=1)))
    stale = site.cli("health", check=False)
    assert stale.returncode == 1
    line = _line(stale.stdout, "worker")
    assert line.split()[1] == "FAIL" and "2 jobs queued for over 300 s and none" in line, line

    # A backlog that a worker is working through (a job beat its heartbeat just now) is not.
    with site.sessions() as session, session.begin():
        session.execute(
            update(Job)
            .where(Job.id == first)
            .values(state=JobState.RUNNING, started_at=utcnow(), heartbeat_at=utcnow())
        )
    busy = _line(site.cli("health", check=False).stdout, "worker")
    assert busy.split()[1] == "ok" and "1 jobs queued" in busy and "busy" in busy, busy


def _line(table: str, check: str) -> str:
    return next(line for line in table.splitlines() if line.startswith(check))


def test_after_a_long_outage_health_fails_and_one_command_resends_every_failed_delivery(
    site: Site,
) -> None:
    from dicomai.audit import Action, record

    first, second = site.ingest_studies(2)
    site.run_jobs()
    # What the worker records when a delivery gives up (dispatch._failed).
    with site.sessions() as session, session.begin():
        for delivery in session.scalars(select(Delivery)):
            delivery.state, delivery.last_error = DeliveryState.FAILED, "association refused"
            record(
                session,
                Action.DELIVERY_FAILED,
                actor="delivery",
                object_type="delivery",
                object_id=delivery.id,
            )
        per_study = {
            uid: session.scalar(
                select(func.count())
                .select_from(Delivery)
                .join(OutputObject)
                .join(Job)
                .join(Study)
                .where(Study.study_uid == uid)
            )
            for uid in (first, second)
        }
    assert all(per_study.values()), per_study
    sick = site.cli("health", check=False)
    assert sick.returncode == 1
    line = _line(sick.stdout, "deliveries")
    assert line.split()[1] == "FAIL" and f"{sum(per_study.values())} failed" in line, line

    usage = site.cli("deliveries", "retry", check=False)
    assert usage.returncode == 2 and "give delivery IDs or --failed" in usage.stderr
    one = site.cli("deliveries", "retry", "--failed", "--study", first, "--reason", "PACS back")
    assert f"{per_study[first]} deliveries pending again" in one.stdout, one.stdout
    with site.sessions() as session:
        states = dict(session.execute(select(Delivery.id, Delivery.state)).all())
    assert sorted(states.values()).count(DeliveryState.PENDING) == per_study[first]
    rest = site.cli("deliveries", "retry", "--failed", "--reason", "PACS back").stdout
    assert f"{per_study[second]} deliveries pending again" in rest, rest
    healthy = _line(site.cli("health", check=False).stdout, "deliveries")
    assert healthy.split()[1] == "ok", healthy

    # A pending delivery waiting out its backoff is sent now once the PACS is back; one named
    # twice is retried once; --study needs --failed, and says so.
    pending = json.loads(site.cli("deliveries", "list", "--json").stdout.splitlines()[0])
    assert pending["state"] == "pending" and pending["next_attempt"], pending
    again = site.cli("deliveries", "retry", str(pending["id"]), str(pending["id"])).stdout
    assert again.strip() == f"delivery {pending['id']} pending again", again
    study_only = site.cli("deliveries", "retry", "--study", first, check=False)
    assert "--study and --destination go with --failed" in study_only.stderr
    nowhere = site.cli("deliveries", "retry", "--failed", "--destination", "nosuch", check=False)
    assert nowhere.returncode == 2 and "'nosuch'" in nowhere.stderr, nowhere.stderr

    # A PACS down for a while: health says so long before its deliveries give up (hours).
    with site.sessions() as session, session.begin():
        session.get_one(Delivery, pending["id"]).attempts = 3
    retrying = _line(site.cli("health", check=False).stdout, "deliveries")
    assert retrying.split()[1] == "FAIL" and "1 still pending after 3" in retrying, retrying


def test_studies_list_shows_what_is_receiving_and_a_study_no_model_takes(site: Site) -> None:
    # There was no `studies list`, and a study no model takes showed an empty jobs table.
    (first,) = site.ingest_studies(1)

    def listed(*options: str) -> dict[str, dict[str, object]]:
        lines = site.cli("studies", "list", "--json", *options).stdout.splitlines()
        return {row["study_uid"]: row for row in map(json.loads, lines)}

    assert listed()[first]["state"] == "receiving" and listed()[first]["jobs"] == 0
    site.run_jobs()
    assert (listed()[first]["state"], listed()[first]["jobs"]) == ("complete", 1)
    assert listed("--state", "receiving") == {}

    ct = pydicom.dcmread(sample_file("CT_small.dcm"))  # the demo model takes DX and CR
    record_dataset(Spool(site.settings.spool_dir), site.sessions, ct)
    complete_quiet_studies(site.sessions, 0)
    assert listed()[ct.StudyInstanceUID]["jobs"] == 0
    shown = site.cli("studies", "show", ct.StudyInstanceUID).stdout
    assert "none: no active, canary or shadow model took its instances" in shown, shown


def test_our_results_and_documents_sent_back_give_no_new_job(site: Site) -> None:
    # A PACS that forwards every new object to dicomai sends our SR and heat maps back: each
    # reopened the study and gave it a new job, whose results came back in turn, without end.
    (study,) = site.ingest_studies(1)
    (job_id,) = site.run_jobs()
    with site.sessions() as session:
        outputs = [site.settings.outputs_dir / o.path for o in session.get_one(Job, job_id).outputs]
    assert {pydicom.dcmread(p).Modality for p in outputs} == {"SR", "OT"}, outputs
    spool = Spool(site.settings.spool_dir)
    for path in outputs:
        record_dataset(spool, site.sessions, pydicom.dcmread(path), calling_ae="PACS")
    pdf = pydicom.dcmread(outputs[0])  # a report of the study as a PDF, from elsewhere
    pdf.SOPClassUID = pdf.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.104.1"
    pdf.SOPInstanceUID = pdf.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    pdf.Manufacturer = "Hospital RIS"
    record_dataset(spool, site.sessions, pdf, calling_ae="PACS")

    assert site.run_jobs() == [], "our own results or a PDF gave the study a new job"
    shown = site.cli("studies", "show", study).stdout
    assert shown.count("not applicable: dicomai's own result") == len(outputs), shown
    assert "not applicable: not an image (Encapsulated PDF Storage)" in shown, shown
