"""The metrics endpoint of `serve`: the counts of all its processes, and job and delivery
states read from the database.

`serve` runs several processes (listener children, the embedded worker), each counting its own
stores and jobs. prometheus-client's multiprocess mode has each process write its values to
a file in one folder, and the endpoint sums them. It chooses where values live when it is
imported, so `share_between_processes` must run before anything imports it; the children
inherit the folder through their environment.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from dicomai.config import MetricsSettings
from dicomai.db.models import Delivery, DeliveryState, Job, JobState

if TYPE_CHECKING:
    from prometheus_client.core import GaugeMetricFamily, Metric
    from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

_FOLDER_ENV = "PROMETHEUS_MULTIPROC_DIR"


def share_between_processes(folder: Path) -> bool:
    """Have this process and those it starts count into `folder`, emptied of an earlier run's
    values (counters restart with the service, as Prometheus expects).

    Returns False, and shares nothing, if prometheus-client is imported already (`serve` run
    inside another Python program): the endpoint then counts this process alone.
    """
    if "prometheus_client" in sys.modules:
        log.warning("metrics: prometheus_client already imported; counting this process only")
        return False
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    for stale in folder.glob("*.db"):
        stale.unlink()
    os.environ[_FOLDER_ENV] = str(folder)
    return True


def start(
    settings: MetricsSettings, sessions: sessionmaker[Session], worker_counters: bool = True
) -> None:
    """Serve `/metrics` on `settings.host:port`.

    Parameters
    ----------
    settings
        Where to listen.
    sessions
        The database, for the job and delivery states.
    worker_counters
        Whether a worker counts into this endpoint (`[worker] embedded`). Without one,
        `dicomai_jobs_total` and `dicomai_deliveries_total` are left out: they would stay 0
        whatever the standalone workers do, and an alert on them would never fire.
    """
    from prometheus_client import REGISTRY, CollectorRegistry, start_http_server
    from prometheus_client.multiprocess import MultiProcessCollector

    from dicomai.metrics import DELIVERIES, JOBS

    counted: Collector = MultiProcessCollector(None) if _FOLDER_ENV in os.environ else REGISTRY
    if not worker_counters:
        left_out = {family.name for counter in (JOBS, DELIVERIES) for family in counter.describe()}
        counted = _Without(counted, left_out)
    registry = CollectorRegistry()
    registry.register(counted)
    registry.register(StateCollector(sessions))
    start_http_server(settings.port, settings.host, registry=registry)


class _Without:
    """The metric families of `source` but those named in `names`."""

    def __init__(self, source: Collector, names: set[str]) -> None:
        self.source = source
        self.names = names

    def collect(self) -> Iterator[Metric]:
        for family in self.source.collect():
            if family.name not in self.names:
                yield family


def process_exited(pid: int) -> None:
    """Drop what an exited process contributed to the gauges of live processes
    (open associations); its counters still count."""
    if _FOLDER_ENV in os.environ:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


class StateCollector:
    """Jobs and deliveries by state, counted in the database at each scrape.

    The database is where every worker, on any machine, records its work, so these gauges
    cover workers whose own counters no endpoint serves (standalone `dicomai worker`).
    """

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions

    def describe(self) -> Iterator[GaugeMetricFamily]:
        # Without it, registering would run `collect`, a query, at start.
        yield from self._families({}, {}, up=False)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            with self.sessions() as session:
                jobs = dict(
                    session.execute(select(Job.state, func.count()).group_by(Job.state)).all()
                )
                deliveries = dict(
                    session.execute(
                        select(Delivery.state, func.count()).group_by(Delivery.state)
                    ).all()
                )
        except Exception as exc:  # a scrape must answer while the database is down
            log.warning("metrics: database: %s", type(exc).__name__)
            yield from self._families({}, {}, up=False)
            return
        yield from self._families(jobs, deliveries, up=True)

    @staticmethod
    def _families(
        jobs: dict[JobState, int], deliveries: dict[DeliveryState, int], up: bool
    ) -> Iterator[GaugeMetricFamily]:
        from prometheus_client.core import GaugeMetricFamily

        database = GaugeMetricFamily(
            "dicomai_database_up", "1 if the last scrape could read the database, else 0"
        )
        database.add_metric([], 1.0 if up else 0.0)
        yield database
        job_family = GaugeMetricFamily("dicomai_jobs_in_state", "Jobs by state", labels=["state"])
        delivery_family = GaugeMetricFamily(
            "dicomai_deliveries_in_state", "Deliveries of results by state", labels=["state"]
        )
        if up:
            for state in JobState:
                job_family.add_metric([state.value], float(jobs.get(state, 0)))
            for delivery_state in DeliveryState:
                delivery_family.add_metric(
                    [delivery_state.value], float(deliveries.get(delivery_state, 0))
                )
        yield job_family
        yield delivery_family
