"""`[core] hostname_callable` of the Celery stack: the name of the worker a task instance ran on.

Both workers of `make test-celery` run on one machine, where Airflow's default (the FQDN) would be
the same for both. Each worker process is started with `CRM_SYNC_CELERY_WORKER_HOSTNAME` set to its
own Celery node name (`worker1@<host>`), and the task processes it forks inherit it, so the
`hostname` Airflow records on a task instance tells the two workers apart.
"""
from __future__ import annotations

import os
import socket


def hostname() -> str:
    return os.environ.get("CRM_SYNC_CELERY_WORKER_HOSTNAME") or socket.getfqdn()
