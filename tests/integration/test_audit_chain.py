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
