"""Hello, cluster: every worker of a scale set says where it runs.

    python flows/hello_cluster.py                 # on the local cloud (after `localcloud start`)
    AZM_TEMPLATE=cbox08 AZM_MANIFEST=default python flows/hello_cluster.py   # on Azure

The printed lines appear in the flow's log as "From worker N: ..." (the Prefect UI shows them).
"""

from __future__ import annotations

import os
import socket

from prefect import flow, task

from prefect_azmanagers import AzureScaleSetTaskRunner

TEMPLATE = os.environ.get("AZM_TEMPLATE", "localcloud-small")
MANIFEST = os.environ.get("AZM_MANIFEST", "localcloud")


@task
def hello(i: int) -> str:
    where = f"{socket.gethostname()} (worker {os.environ.get('AZM_WORKER_ID')}, pid {os.getpid()})"
    print(f"hello {i} from {where}")
    return where


@flow(task_runner=AzureScaleSetTaskRunner(TEMPLATE, 2, manifest=MANIFEST, ppi=2, waitfor=True))
def hello_cluster(n: int = 8) -> list[str]:
    """Runs `n` greetings on 2 instances x 2 workers; returns the distinct places they ran.

    `waitfor=True` starts the flow once all four workers joined, so the greetings spread over
    them (idle workers take queued calls in turn); without it the first worker to join may run
    them all before the others arrive."""
    return sorted(set(hello.map(range(n)).result()))


if __name__ == "__main__":
    for place in hello_cluster():
        print(place)
