"""The Celery app: late acknowledgement, one task at a time, SQL as the source of truth."""

from __future__ import annotations

from celery import Celery

from dicomai.config import Settings

INFERENCE_QUEUE = "dicomai.inference"
DELIVERY_QUEUE = "dicomai.delivery"
RUN_JOB = "dicomai.run_job"
DELIVER = "dicomai.deliver"

# Seconds a Redis connect, or a command on a connection, may take. Without them a Redis host
# that drops packets (down, or behind a firewall) held a ring for the kernel's SYN retries,
# 134 s, and `serve`'s loop, which also assembles studies and rings deliveries, with it. A
# healthy Redis answers in milliseconds; the consumer's BRPOP waits 1 s (kombu's
# brpop_timeout), under the 5 s, and `dicomai health` waits as long.
REDIS_TIMEOUT_SECONDS = 5.0


def make_app(settings: Settings) -> Celery:
    """A Celery app for `settings`; the embedded broker is a spool folder, no server needed."""
    app = Celery("dicomai", broker=settings.broker_url, set_as_current=False)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_routes={RUN_JOB: {"queue": INFERENCE_QUEUE}, DELIVER: {"queue": DELIVERY_QUEUE}},
        broker_connection_retry_on_startup=True,
        # A publish gives up on an unreachable broker after this (the reconciler rings again).
        broker_connection_timeout=REDIS_TIMEOUT_SECONDS,
        worker_hijack_root_logger=False,
        task_serializer="json",
        accept_content=["json"],
    )
    if settings.embedded_broker:
        folders = {name: settings.broker_dir / name for name in ("queue", "processed", "control")}
        for folder in folders.values():
            folder.mkdir(parents=True, exist_ok=True)
        app.conf.broker_transport = "workers.filesystem_broker:Transport"
        app.conf.broker_transport_options = {
            "data_folder_in": str(folders["queue"]),
            "data_folder_out": str(folders["queue"]),
            "processed_folder": str(folders["processed"]),
            "control_folder": str(folders["control"]),
            "store_processed": False,
            # The folder is listed this often: a study waited 50 ms on average for its job at
            # 0.1 s; at 0.02 s an idle daemon's CPU stays at 2 % (measured over 30 s, both).
            "polling_interval": 0.02,
        }
    else:
        app.conf.broker_transport_options = {
            "socket_connect_timeout": REDIS_TIMEOUT_SECONDS,
            "socket_timeout": REDIS_TIMEOUT_SECONDS,
        }
    return app
