"""Prometheus metric definitions of the listener and workers."""

from __future__ import annotations

import enum

from prometheus_client import Counter, Gauge, Histogram


class JobOutcome(enum.StrEnum):
    """How a job's attempt ended: the `state` label of `dicomai_jobs_total`."""

    DONE = "done"
    FAILED = "failed"  # for good: a broken model package, or the last attempt
    RETRYING = "retrying"  # back to the queue for another attempt


class DeliveryOutcome(enum.StrEnum):
    """How a delivery attempt ended: the `outcome` label of `dicomai_deliveries_total`."""

    SENT = "sent"
    RETRYING = "retrying"  # failed; tried again after the backoff
    FAILED = "failed"  # failed, and the last of `[delivery] max_attempts`


# The `calling_ae` of stores from a title the allow-list does not name: with `allow_any` a
# peer could otherwise add a series per title it makes up.
OTHER_SENDERS = "other"


STORES = Counter(
    "dicomai_stores_total",
    "C-STORE requests answered, by calling AE and status",
    ["calling_ae", "status"],
)
STORED_BYTES = Counter("dicomai_stored_bytes_total", "Bytes of instances written to the spool")
STORE_SECONDS = Histogram(
    "dicomai_store_seconds",
    "Time from a C-STORE request to its answer",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
# Under `serve` every process counts into shared files (`dicomai.metrics_server`): the
# modes say how the endpoint combines the processes' gauges.
SPOOL_FREE_BYTES = Gauge(
    "dicomai_spool_free_bytes",
    "Free bytes on the spool's file system",
    multiprocess_mode="livemax",
)
OPEN_ASSOCIATIONS = Gauge(
    "dicomai_open_associations", "Associations currently open", multiprocess_mode="livesum"
)
REJECTED_ASSOCIATIONS = Counter(
    "dicomai_rejected_associations_total", "Associations rejected, by reason", ["reason"]
)
JOBS = Counter(
    "dicomai_jobs_total", "Job attempts ended, by outcome (done, failed, retrying)", ["state"]
)
DELIVERIES = Counter(
    "dicomai_deliveries_total",
    "Delivery attempts, by outcome (sent, retrying, failed)",
    ["outcome"],
)
# Every outcome is exposed from the start, at 0: a series that appears with its first
# increment hides that increment from rate() and increase().
for _job in JobOutcome:
    JOBS.labels(state=_job)
for _delivery in DeliveryOutcome:
    DELIVERIES.labels(outcome=_delivery)


def sender_label(calling_ae: str, peers: frozenset[str] | None) -> str:
    """The `calling_ae` label of a store from `calling_ae`: the title, stripped as the access
    policy strips it, if `peers` (the allow-list's titles) names it, else `OTHER_SENDERS`;
    with `peers` None, the title itself."""
    title = calling_ae.strip()
    if peers is None or title in peers:
        return title
    return OTHER_SENDERS
