"""Prometheus metric definitions of the listener and workers."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

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
JOBS = Counter("dicomai_jobs_total", "Jobs finished, by final state", ["state"])
DELIVERIES = Counter("dicomai_deliveries_total", "Delivery attempts, by outcome", ["outcome"])
