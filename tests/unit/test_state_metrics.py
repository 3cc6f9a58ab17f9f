"""Job and delivery states on the metrics endpoint, read from the database at each scrape."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest

from dicomai.db.migrate import upgrade
from dicomai.db.session import make_engine, make_sessionmaker
from dicomai.metrics_server import StateCollector


def scrape(url: str) -> str:
    registry = CollectorRegistry()
    engine = make_engine(url)
    try:
        registry.register(StateCollector(make_sessionmaker(engine)))
        return generate_latest(registry).decode()
    finally:
        engine.dispose()


def test_every_state_is_reported_with_zero_on_an_empty_database(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url)
    text = scrape(url)
    assert "dicomai_database_up 1.0" in text
    for state in ("queued", "running", "done", "failed", "not_applicable", "cancelled"):
        assert f'dicomai_jobs_in_state{{state="{state}"}} 0.0' in text
    for state in ("pending", "sent", "failed"):
        assert f'dicomai_deliveries_in_state{{state="{state}"}} 0.0' in text


def test_a_scrape_answers_while_the_database_cannot_be_read(tmp_path: Path) -> None:
    # A schema never upgraded: the query fails as it would with the server down.
    text = scrape(f"sqlite:///{tmp_path / 'empty.sqlite'}")
    assert "dicomai_database_up 0.0" in text
    assert "dicomai_jobs_in_state{" not in text
