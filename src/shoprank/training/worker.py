"""Worker identity for Airflow's ``[core] hostname_callable``.

Set ``AIRFLOW__CORE__HOSTNAME_CALLABLE=shoprank.training.worker.worker_hostname`` and
``SHOPRANK_WORKER_NAME=gpu-node-1`` on a Celery worker: its task instances then record that
name as their hostname (what the UI and ``/taskInstances`` show).  Without the variable it is
the machine's FQDN, Airflow's default.  Useful when several workers share one host.
"""

from __future__ import annotations

import socket


def worker_hostname() -> str:
    from shoprank.config import get_settings

    return (get_settings().training.worker_name or "").strip() or socket.getfqdn()
