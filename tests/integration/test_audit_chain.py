"""The audit trail is a hash chain: concurrent writers keep it whole, an edited row breaks it."""

from __future__ import annotations

import threading

import pytest
from rollout_site import Site
from sqlalchemy import text

from dicomai.audit import Action, record
from dicomai.ingest.header import Header
from dicomai.ingest.recorder import Received, record_instance


def write_concurrently(site: Site, threads: int = 8, rows: int = 10) -> None:
    """Audit rows from `threads` threads at once: half of them record two job events per
    transaction, the other half received instances (whose rows are written before their
    audit row, which takes another path to the chain's head)."""

    def writer(n: int) -> None:
        for i in range(rows):
            if n % 2:
                header = Header(
                    "1.2.9", "1.2.9.1", f"1.2.9.1.{n}.{i}", "1.2.840.10008.5.1.4.1.1.2", "CT", None
                )
                received = Received(
                    header, "1.2.840.10008.1.2.1", f"1.2.9/{n}.{i}.dcm", 1, "00", "CT"
                )
                record_instance(site.sessions, received)
                continue
            with site.sessions() as session, session.begin():
                record(session, Action.JOB_CREATED, actor=f"t{n}", object_type="job", object_id=i)
                record(session, Action.JOB_ENQUEUED, actor=f"t{n}", object_type="job", object_id=i)

    workers = [threading.Thread(target=writer, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()


@pytest.fixture(params=["sqlite", "postgresql"])
def site(request: pytest.FixtureRequest, tmp_path):
    url = request.getfixturevalue("postgres_url") if request.param == "postgresql" else None
    site = Site(tmp_path, url)
    yield site
    site.close()


def test_concurrent_writers_keep_one_chain_and_an_edit_breaks_it(site: Site) -> None:
    write_concurrently(site)
    verified = site.cli("audit", "verify")
    assert "audit chain intact: 120 rows verified" in verified.stdout, verified.stdout

    with site.engine.begin() as connection:
        connection.execute(text("UPDATE audit_events SET actor = 'someone-else' WHERE id = 42"))
    broken = site.cli("audit", "verify", check=False)
    assert broken.returncode == 2
    assert broken.stderr.strip() == (
        "error: audit chain broken at row 42: content does not match its hash "
        "(41 rows before it verified)"
    ), broken.stderr


def test_a_deleted_row_is_named_by_the_row_after_it(tmp_path) -> None:
    site = Site(tmp_path)
    write_concurrently(site, threads=2, rows=3)
    with site.engine.begin() as connection:
        connection.execute(text("DELETE FROM audit_events WHERE id = 5"))
    broken = site.cli("audit", "verify", check=False)
    assert "row 6: does not follow the row before it" in broken.stderr, broken.stderr
    site.close()


def test_a_rewritten_or_removed_chain_is_caught_by_the_head_kept_elsewhere(tmp_path) -> None:
    # Whoever can write the table can recompute every hash after an edit, or remove them all
    # (which verified as "intact: 0 rows"): the head noted earlier outside the database tells.
    site = Site(tmp_path)
    write_concurrently(site, threads=2, rows=3)
    verified = site.cli("audit", "verify").stdout
    head = verified.split("head: row ")[1].split()[1]
    assert len(head) == 64, verified
    assert site.cli("audit", "verify", "--expect-head", head).returncode == 0

    with site.sessions() as session, session.begin():
        record(session, Action.MODEL_ACTIVATED, actor="intruder", object_type="model")
    forged = site.cli("audit", "verify").stdout  # a forged row, correctly chained
    assert "intact" in forged and head not in forged.split("head: row ")[1], forged
    assert site.cli("audit", "verify", "--expect-head", head).returncode == 0  # still there

    with site.engine.begin() as connection:
        connection.execute(text("UPDATE audit_events SET actor = 'x' WHERE id = 3"))
    _rechain(site)
    assert "intact" in site.cli("audit", "verify").stdout, "the rechained trail should verify"
    rewritten = site.cli("audit", "verify", "--expect-head", head, check=False)
    assert rewritten.returncode == 2 and "no longer in the chain" in rewritten.stderr, rewritten

    with site.engine.begin() as connection:
        connection.execute(text("UPDATE audit_events SET hash = NULL, prev_hash = NULL"))
    removed = site.cli("audit", "verify", check=False)
    assert removed.returncode == 2 and "no row carries a hash" in removed.stderr, removed.stderr
    site.close()


def _rechain(site: Site) -> None:
    """Recompute every hash in order, as someone with write access to the table can."""
    from sqlalchemy import select

    from dicomai.audit import GENESIS, event_hash
    from dicomai.db.models import AuditEvent

    with site.sessions() as session, session.begin():
        previous = GENESIS
        for event in session.scalars(select(AuditEvent).order_by(AuditEvent.id)):
            event.prev_hash = previous
            event.hash = event_hash(event)
            previous = event.hash
