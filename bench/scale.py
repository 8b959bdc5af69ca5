"""A large flow against a real Prefect server: is every task run recorded, does throughput sag as
the database grows, does the driver stay small? One process tree, one run:

    python -m bench.scale [--tasks 10000] [--only postgres|sqlite] [--runner azure|threadpool]
                          [--instances 16 --ppi 4] [--max-unrecorded 512]

For each server setup (PostgreSQL + Redis messaging from scripts/services.sh; the default
SQLite server), a fresh server runs the same flow of N trivial tasks, submitted at once, on
ThreadPoolTaskRunner(8) and on AzureScaleSetTaskRunner (a fresh runner, waitfor=True, on the
local cloud; PostgreSQL: instances x ppi workers, SQLite: half of them). Per run it prints
tasks/s overall and per fifth of the run, the task runs the API holds for the flow run by
state (polled until the server has recorded them, at most --settle seconds), the server log's
"dropping message" lines, the driver's RSS growth per 1,000 completed tasks (the flow keeps no
future: each is dropped when it completes) and the server's CPU seconds. Not a test: the
figures depend on the machine; nothing asserts on them. JSON under bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

from bench.services import (
    bench_environment,
    database_services,
    free_port,
    local_cloud,
    prefect_server,
    recorded,
    write_results,
)

_OWN_HOME = bench_environment()  # before prefect is imported

import psutil  # noqa: E402
from prefect import flow, task  # noqa: E402
from prefect.settings import PREFECT_API_URL, temporary_settings  # noqa: E402
from prefect.task_runners import ThreadPoolTaskRunner  # noqa: E402

MB = 1 << 20


@task
def trivial(i: int) -> int:
    return i


class Completions:
    """Completion times and driver RSS every 1,000 completions; holds no future."""

    def __init__(self, n: int):
        self.n = n
        self.times: list[float] = []
        self.failed = 0
        self.rss: list[tuple[int, int]] = []  # (completed, bytes)
        self._lock = threading.Lock()
        self._pending: set = set()
        self.all_done = threading.Event()

    def watch(self, future) -> None:
        with self._lock:
            self._pending.add(future)
        future.add_done_callback(self._done)

    def _done(self, future) -> None:
        # the State the runner settled the future with (future.state could ask the API, from
        # a thread outside the flow's settings)
        try:
            ok = future.wrapped_future.result().is_completed()
        except BaseException:  # noqa: BLE001 - counted as failed, never lost
            ok = False
        with self._lock:
            self._pending.discard(future)
            self.times.append(time.perf_counter())
            self.failed += not ok
            count = len(self.times)
        if count % 1000 == 0:
            self.rss.append((count, psutil.Process().memory_info().rss))
        if count == self.n:
            self.all_done.set()


def run_flow(task_runner, n: int, timeout: float) -> dict:
    @flow(task_runner=task_runner, name="bench-scale")
    def large(count: int) -> dict:
        from prefect.runtime import flow_run

        done = Completions(count)
        body = time.time()
        t0 = time.perf_counter()
        for i in range(count):
            done.watch(trivial.submit(i))
        submitted = time.perf_counter() - t0
        finished = done.all_done.wait(timeout)
        return {"flow_run_id": flow_run.id, "body": body, "t0": t0, "submit_s": submitted,
                "finished": finished, "times": list(done.times), "failed": done.failed,
                "rss": done.rss}

    entered = time.time()
    out = large(n)
    times = sorted(out["times"])
    fifths = []
    for k in range(5):
        lo, hi = k * n // 5, (k + 1) * n // 5
        if hi <= len(times):
            start = out["t0"] if k == 0 else times[lo - 1]
            fifths.append(round((hi - lo) / (times[hi - 1] - start), 1))
    rss = out["rss"]
    growth = ((rss[-1][1] - rss[0][1]) / MB / ((rss[-1][0] - rss[0][0]) / 1000)
              if len(rss) >= 2 else None)
    seconds = (times[-1] - out["t0"]) if times else None
    return {"flow_run_id": out["flow_run_id"], "completed_in_flow": len(times),
            "failed_in_flow": out["failed"], "all_finished": out["finished"],
            "join_s": round(out["body"] - entered, 1), "submit_s": round(out["submit_s"], 2),
            "seconds": seconds and round(seconds, 1),
            "tasks_per_s": seconds and round(len(times) / seconds, 1),
            "tasks_per_s_by_fifth": fifths,
            "driver_rss_MB_per_1000_tasks": growth if growth is None else round(growth, 2),
            "driver_rss_MB_end": round(rss[-1][1] / MB, 1) if rss else None}


def server_cpu(port: int) -> float:
    """CPU seconds of the Prefect server listening on `port` (with its children)."""
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info["cmdline"] or []
        if "server" in cmd and "start" in cmd and str(port) in cmd:
            procs = [proc, *proc.children(recursive=True)]
            return sum(p.cpu_times().user + p.cpu_times().system for p in procs)
    return 0.0


def measure(setup: str, runners: dict, n: int, settle: float, timeout: float) -> dict:
    """A fresh server of `setup` (and the local cloud on it); each runner's flow in turn."""
    root = Path(tempfile.mkdtemp(prefix=f"azm-scale-{setup}-"))
    api_url = f"http://127.0.0.1:{free_port()}/api"
    port = int(api_url.rsplit(":", 1)[1].split("/")[0])
    out = {}
    try:
        with database_services(root, setup) as database, \
                prefect_server(root, api_url, database), \
                temporary_settings(updates={PREFECT_API_URL: api_url}):
            os.environ["PREFECT_API_URL"] = api_url  # the local cloud CLI and workers' children
            with local_cloud(root, api_url):
                for name, make in runners.items():
                    log = root / "prefect-server.log"
                    log_at = log.stat().st_size
                    cpu0 = server_cpu(port)
                    try:
                        row = run_flow(make(), n, timeout)
                        row["api_task_runs_by_state"] = recorded(api_url, row["flow_run_id"], n,
                                                                 settle)
                    except Exception as exc:  # a server that gives up is a result too
                        row = {"error": f"{type(exc).__name__}: {exc}"[:500]}
                    row["server_cpu_s"] = round(server_cpu(port) - cpu0, 1)
                    with log.open("rb") as f:
                        f.seek(log_at)
                        row["dropping_message_lines"] = f.read().count(b"dropping message")
                    out[name] = row
                    print(f"  {setup:<9}{name:<34}{json.dumps(_short(row))}", flush=True)
    finally:
        os.environ.pop("PREFECT_API_URL", None)
        shutil.rmtree(root, ignore_errors=True)
    return out


def _short(row: dict) -> dict:
    return {k: row.get(k) for k in ("tasks_per_s", "tasks_per_s_by_fifth", "api_task_runs_by_state",
                                    "dropping_message_lines", "driver_rss_MB_per_1000_tasks",
                                    "server_cpu_s", "join_s", "error") if row.get(k) is not None}


def azure(instances: int, ppi: int, max_unrecorded: int | None):
    from prefect_azmanagers.task_runner import AzureScaleSetTaskRunner

    return lambda: AzureScaleSetTaskRunner("localcloud-small", instances, manifest="localcloud",
                                           ppi=ppi, waitfor=True, join_timeout=900,
                                           group=f"scale-{instances}x{ppi}",
                                           max_unrecorded=max_unrecorded)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--instances", type=int, default=16)
    parser.add_argument("--ppi", type=int, default=4)
    parser.add_argument("--only", choices=("postgres", "sqlite"), default=None)
    parser.add_argument("--runner", choices=("azure", "threadpool"), default=None,
                        help="one runner only (a run on a fresh server: the other's backlog "
                             "of unrecorded task runs does not delay it)")
    parser.add_argument("--settle", type=float, default=300,
                        help="seconds to wait for the server to record every task run")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per flow at most")
    parser.add_argument("--max-unrecorded", type=int, default=512,
                        help="the Azure runner's max_unrecorded; 0: no such bound")
    args = parser.parse_args(argv)
    n, i, p = args.tasks, args.instances, args.ppi
    report: dict = {"when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "cpus": os.cpu_count(), "tasks": n, "max_unrecorded": args.max_unrecorded,
                    "setups": {}}
    print(f"{n} trivial tasks per flow, {os.cpu_count()} CPUs", flush=True)
    try:
        for setup, workers in (("postgres", (i, p)), ("sqlite", (max(i // 2, 1), p))):
            if args.only and setup != args.only:
                continue
            runners = {"ThreadPoolTaskRunner(8)": lambda: ThreadPoolTaskRunner(8),
                       f"AzureScaleSetTaskRunner {workers[0]}x{workers[1]}":
                           azure(*workers, args.max_unrecorded or None)}
            if args.runner:
                runners = {k: v for k, v in runners.items()
                           if k.startswith({"azure": "Azure", "threadpool": "ThreadPool"}[args.runner])}
            report["setups"][setup] = measure(setup, runners, n, args.settle, args.timeout)
    finally:
        if _OWN_HOME:
            shutil.rmtree(_OWN_HOME, ignore_errors=True)
    print(f"\n{'setup':<10}{'runner':<34}{'tasks/s':>8}  {'by fifth':<34}{'in API':<28}"
          f"{'drops':>6}{'RSS MB/1k':>10}{'srv CPU s':>10}")
    for setup, rows in report["setups"].items():
        for name, r in rows.items():
            api = r.get("api_task_runs_by_state", {})
            print(f"{setup:<10}{name:<34}{r.get('tasks_per_s', '-')!s:>8}  "
                  f"{str(r.get('tasks_per_s_by_fifth', r.get('error', '')))[:33]:<34}"
                  f"{', '.join(f'{k} {v}' for k, v in api.items())[:27]:<28}"
                  f"{r['dropping_message_lines']:>6}{r.get('driver_rss_MB_per_1000_tasks', '-')!s:>10}"
                  f"{r['server_cpu_s']:>10}")
    write_results("scale", report, report["when"])
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
