"""azure-vm worker figures on the local cloud (not collected by default; run it by hand):

    .venv/bin/pytest tests/worker/measure_worker.py -s -q

With a `prefect worker start` subprocess and the session's Prefect server and local cloud, it
runs the `hello` deployment RUNS times, one after the other (the first is "cold": the first VM
of the session and the worker's first run), and records per run, from `prefect deployment
run`: VM provisioned, the engine's `Beginning flow run`, the flow's own first line (`hello ...
from <vm>`), Completed; and Completed -> VM deleted (ARM listing polled every 0.2 s). Prints
them with the medians of the warm runs and writes the raw rows to bench/results/worker-*.json.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from datetime import datetime, timezone

from bench.services import write_results
from tests.worker.conftest import leftovers
from tests.worker.runs import messages_of, run_deployment

RUNS = 4
COLUMNS = ["provisioned", "engine_first_line", "flow_first_line", "completed", "vm_deleted"]


def _logs(flow_run_id):
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    with get_client(sync_client=True) as client:
        return client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))


def _first(logs, what: str, match) -> datetime:
    try:
        return next(log.timestamp for log in logs if match(log))
    except StopIteration:
        raise AssertionError(f"no {what} in the run's logs") from None


def _since(started: datetime):
    return lambda moment: round((moment - started).total_seconds(), 2)


def test_measure_worker(vm_pool, vm_worker, localcloud):
    from prefect import get_client

    deployment = vm_pool("flows.py:hello", "hello-figures", parameters={"name": "figures"})
    when = datetime.now(timezone.utc).isoformat(timespec="seconds")
    rows = []
    for index in range(RUNS):
        started = datetime.now(timezone.utc)
        flow_run_id = run_deployment(deployment)
        with get_client(sync_client=True) as client:
            while not (flow_run := client.read_flow_run(flow_run_id)).state.is_final():
                time.sleep(0.2)
        while [x for x in leftovers(localcloud, vm_pool.pool) if x.startswith("ARM VM")]:
            time.sleep(0.2)
        gone = datetime.now(timezone.utc)
        assert flow_run.state.is_completed(), messages_of(flow_run_id)
        logs = _logs(flow_run_id)
        completed = flow_run.state.timestamp
        since = _since(started)
        rows.append({
            "run": index, "cold": index == 0, "flow_run_id": str(flow_run_id),
            "provisioned": since(_first(logs, "provisioning line",
                                        lambda log: " provisioned in " in log.message)),
            "engine_first_line": since(_first(logs, "engine line", lambda log: log.name.startswith(
                "prefect.flow_runs") and "Beginning flow run" in log.message)),
            "flow_first_line": since(_first(logs, "hello line",
                                            lambda log: log.message.startswith("hello figures"))),
            "completed": since(completed),
            "vm_deleted": round((gone - completed).total_seconds(), 2),
        })
    warm = rows[1:]
    medians = {c: statistics.median(r[c] for r in warm) for c in COLUMNS}
    print("\nazure-vm worker on the local cloud (s from `deployment run`; vm_deleted from "
          "Completed):\n  " + " | ".join(COLUMNS))
    for row in rows:
        print(f"  {'cold' if row['cold'] else 'warm'} " + " | ".join(f"{row[c]:6.1f}"
                                                                   for c in COLUMNS))
    print("  warm median " + " | ".join(f"{medians[c]:6.1f}" for c in COLUMNS))
    write_results("worker", {
        "bench": "azure-vm worker: deployment run -> first lines, run end -> VM deleted",
        "when": when, "host": platform.node(), "cpus": os.cpu_count(),
        "columns": {"provisioned": "deployment run -> the worker's 'VM ... provisioned' log",
                    "engine_first_line": "deployment run -> the engine's 'Beginning flow run'",
                    "flow_first_line": "deployment run -> the flow's own 'hello ... from <vm>'",
                    "completed": "deployment run -> the Completed state's timestamp",
                    "vm_deleted": "Completed -> the VM gone from ARM's list (0.2 s polls)"},
        "rows": rows, "warm_medians": medians}, when)
