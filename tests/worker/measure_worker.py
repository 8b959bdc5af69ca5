"""azure-vm worker figures on the local cloud (not collected by default; run it by hand):

    .venv/bin/pytest tests/worker/measure_worker.py -s -q

With a `prefect worker start` subprocess and the session's Prefect server and local cloud, it
runs the `hello` deployment 3 times, one after the other, and prints per run: `deployment run`
-> VM provisioned, -> the flow's first log line, -> Completed, and Completed -> VM deleted
(ARM listing polled every 0.2 s), then the medians.
"""

from __future__ import annotations

import statistics
import time
from datetime import datetime, timezone

from tests.worker.conftest import leftovers
from tests.worker.test_worker_e2e import _messages, _run_deployment


def _logs(flow_run_id):
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        return client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))


def test_measure_worker(vm_pool, vm_worker, localcloud):
    from prefect import get_client

    deployment = vm_pool("flows.py:hello", "hello-figures")
    rows = []
    for _ in range(3):
        started = datetime.now(timezone.utc)
        flow_run_id = _run_deployment(deployment)
        with get_client(sync_client=True) as client:
            while not (flow_run := client.read_flow_run(flow_run_id)).state.is_final():
                time.sleep(0.2)
        while [x for x in leftovers(localcloud, vm_pool.pool) if x.startswith("ARM VM")]:
            time.sleep(0.2)
        gone = datetime.now(timezone.utc)
        assert flow_run.state.is_completed(), _messages(flow_run_id)
        logs = _logs(flow_run_id)
        provisioned = next(log.timestamp for log in logs if " provisioned in " in log.message)
        first = next(log.timestamp for log in logs if log.name.startswith("prefect.flow_runs")
                     and "Beginning flow run" in log.message)
        completed = flow_run.state.timestamp
        rows.append([(provisioned - started).total_seconds(), (first - started).total_seconds(),
                     (completed - started).total_seconds(), (gone - completed).total_seconds()])
    print("\nazure-vm worker on the local cloud (s): run->VM provisioned | run->first flow log "
          "line | run->Completed | Completed->VM deleted")
    for row in rows:
        print("  " + " | ".join(f"{v:6.1f}" for v in row))
    print("  median " + " | ".join(f"{statistics.median(c):6.1f}" for c in zip(*rows)))
