"""Cold start as a user meets it: a fresh AzureScaleSetTaskRunner per flow run (nothing warmed
by hand), beside a shared AzureCluster (its first flow run and the later ones) and Prefect's
ThreadPoolTaskRunner(8), all on the same N-task flow in one run. The local cloud's manifest
names a blob container, so rows with and without it (and ThreadPoolTaskRunner with it) show
what Prefect's per-task cache lookup in that storage costs:

    python -m bench.cold_start [--tasks 400] [--workers 4] [--rounds 2] [--server postgres]

Each flow submits N trivial tasks at once. Timed from the first line of the flow's body (the
runner has entered: with waitfor=True every worker has joined): the first result, the last
one (tasks/s) and each task's start latency. The fresh runner's join (runner entered -> body)
is reported beside it. After each flow run the bench waits until the API has recorded its
task runs ("recorded after": ThreadPoolTaskRunner returns before the server has caught up), so
no row starts on a server still busy with the previous one's backlog; "recorded tasks/s" counts
from the flow's body to that moment (a fresh runner's includes deleting its scale set). Starts
a Prefect server (SQLite, or `--server postgres`: PostgreSQL + Redis, which keeps server
overload out of the figures) and the local cloud, and stops them.
Results: a table on stdout and JSON under bench/results/.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from bench.services import (
    bench_environment,
    database_services,
    local_cloud,
    prefect_server,
    recorded,
    write_results,
)

_OWN_HOME = bench_environment()  # before prefect is imported

from prefect import flow, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.futures import as_completed  # noqa: E402
from prefect.task_runners import ThreadPoolTaskRunner  # noqa: E402



POOL = "ThreadPoolTaskRunner(8)"
POOL_BLOB = "ThreadPoolTaskRunner(8), blob result storage"
FRESH_NO_BLOB = "fresh, manifest without blob container"
FRESH_NO_CACHE = "fresh, tasks with cache_policy=NO_CACHE"
NO_BLOB = "localcloud-noblob"


@task
def started(submitted_at: float) -> float:
    return time.time() - submitted_at


def timed_flow(task_runner, n: int, trivial=started, **flow_options) -> dict:
    """One flow run of n `trivial` tasks: join (runner entered -> body), first result, tasks/s,
    how long after the flow returned the API held all n task runs final, and tasks/s until
    then."""
    from prefect.runtime import flow_run

    @flow(task_runner=task_runner, name="bench-cold-start", **flow_options)
    def cold_flow(count: int) -> tuple[str, float, float, float, list[float]]:
        body = time.time()
        t0 = time.perf_counter()
        futures = [trivial.submit(time.time()) for _ in range(count)]
        first = None
        for done in as_completed(futures):
            first = first or time.perf_counter() - t0
        latencies = [f.result() for f in futures]
        return flow_run.id, body, first, time.perf_counter() - t0, latencies

    entered = time.time()
    flow_run_id, body, first, seconds, latencies = cold_flow(n)
    returned = time.time()
    counts = recorded(os.environ["PREFECT_API_URL"], flow_run_id, n, settle=600)
    recorded_at = time.time()
    latencies.sort()
    return {"join_s": round(body - entered, 2), "first_result_s": round(first, 3),
            "seconds": round(seconds, 2), "tasks_per_s": round(n / seconds, 1),
            "recorded_after_s": round(recorded_at - returned, 1),
            "recorded_tasks_per_s": round(n / (recorded_at - body), 1),
            "api_task_runs_by_state": counts,
            "start_latency_p50_ms": round(1000 * latencies[len(latencies) // 2], 1),
            "start_latency_p95_ms": round(1000 * latencies[int(len(latencies) * 0.95)], 1)}


def measure_cold_start(n: int, w: int, rounds: int) -> dict:
    """Rows: ThreadPoolTaskRunner(8) (local and blob result storage), `rounds` fresh runners
    (with and without the manifest's blob container, and with NO_CACHE tasks), a shared
    cluster's first flow run and `rounds` later ones. Each row is one flow run, timed as
    `timed_flow` says."""
    from prefect_azure import AzureBlobStorageContainer

    from prefect_azmanagers.blocks import load_manifest
    from prefect_azmanagers.cluster.cluster import AzureCluster
    from prefect_azmanagers.task_runner import AzureScaleSetTaskRunner

    # The local cloud's manifest names a blob container, the workers' default result storage.
    # Prefect looks every task's cache key up in it (a blob GET, and an INFO log line, per
    # task run, persisted or not): the ThreadPool row with the same storage and the fresh row
    # without it show what that lookup costs, apart from the runner; tasks made with
    # cache_policy=NO_CACHE (the user's remedy for tasks that need no cache) skip it.
    load_manifest("localcloud").model_copy(update={"blob_container": None}).save(
        NO_BLOB, overwrite=True)
    blob = AzureBlobStorageContainer.load("localcloud")
    rows: dict[str, list[dict]] = {POOL: [], POOL_BLOB: [], "fresh": [], FRESH_NO_BLOB: [],
                                   FRESH_NO_CACHE: [], "shared, first flow run": [],
                                   "shared, later flow runs": []}

    def run(name: str, runner, **options) -> None:
        row = timed_flow(runner, n, **options)
        rows[name].append(row)
        print(f"  {name:<40} {row['tasks_per_s']:>7} tasks/s  first result "
              f"{row['first_result_s']:.3f} s  join {row['join_s']} s  recorded after "
              f"{row['recorded_after_s']} s", flush=True)

    for _ in range(rounds):
        run(POOL, ThreadPoolTaskRunner(8))
        run(POOL_BLOB, ThreadPoolTaskRunner(8), result_storage=blob, persist_result=False)
        run("fresh", AzureScaleSetTaskRunner("localcloud-small", w, manifest="localcloud",
                                             waitfor=True))
        run(FRESH_NO_BLOB, AzureScaleSetTaskRunner("localcloud-small", w, manifest=NO_BLOB,
                                                   waitfor=True))
        run(FRESH_NO_CACHE, AzureScaleSetTaskRunner("localcloud-small", w, manifest="localcloud",
                                                    waitfor=True),
            trivial=started.with_options(cache_policy=NO_CACHE))
    cluster = AzureCluster("localcloud-small", w, manifest="localcloud",
                           progress=False, waitfor=True, group="bench-cold").start()
    try:
        run("shared, first flow run", AzureScaleSetTaskRunner(cluster=cluster))
        for _ in range(rounds):
            run("shared, later flow runs", AzureScaleSetTaskRunner(cluster=cluster))
    finally:
        cluster.close()
    return summarize(rows)


def summarize(rows: dict[str, list[dict]]) -> dict:
    """Medians per row and each row's tasks/s beside ThreadPoolTaskRunner(8)'s."""
    def median(name: str, key: str) -> float:
        return round(statistics.median(r[key] for r in rows[name]), 3)

    pool = median(POOL, "tasks_per_s")
    table = {name: {"tasks_per_s": median(name, "tasks_per_s"),
                    "vs_threadpool": round(median(name, "tasks_per_s") / pool, 2),
                    "first_result_s": median(name, "first_result_s"),
                    "start_latency_p50_ms": median(name, "start_latency_p50_ms"),
                    "join_s": median(name, "join_s"),
                    "recorded_after_s": median(name, "recorded_after_s"),
                    "recorded_tasks_per_s": median(name, "recorded_tasks_per_s"),
                    "flow_runs": rows[name]}
             for name in rows}
    print(f"\n{'runner':<40}{'tasks/s':>9}{'x pool':>8}{'first result s':>16}{'join s':>8}"
          f"{'recorded after s':>18}{'recorded tasks/s':>18}")
    for name, r in table.items():
        print(f"{name:<40}{r['tasks_per_s']:>9}{r['vs_threadpool']:>8}"
              f"{r['first_result_s']:>16}{r['join_s']:>8}{r['recorded_after_s']:>18}"
              f"{r['recorded_tasks_per_s']:>18}")
    print("(medians of the flow runs; goals: fresh >= 1.0x ThreadPoolTaskRunner(8), "
          "first result < 0.3 s)")
    return table


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=400)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2, help="flow runs per row (medians)")
    parser.add_argument("--server", choices=("sqlite", "postgres"), default="sqlite")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="azm-bench-"))
    report: dict = {"when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "cpus": os.cpu_count(), "tasks": args.tasks, "workers": args.workers,
                    "server": args.server}
    try:
        with database_services(root, args.server) as database, \
                prefect_server(root, os.environ["PREFECT_API_URL"], database) as api_url, \
                local_cloud(root, api_url):
            print(f"{args.tasks} trivial tasks, {args.workers} workers, {os.cpu_count()} CPUs",
                  flush=True)
            report["runners"] = measure_cold_start(args.tasks, args.workers, args.rounds)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        if _OWN_HOME:
            shutil.rmtree(_OWN_HOME, ignore_errors=True)
    write_results("cold_start", report, report["when"])
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
