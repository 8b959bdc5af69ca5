"""Fixed n versus adaptive capacity on one bursty workload, in one run: completion time and the
VM time used, read from the local cloud's instance-seconds counters (not a clock of our own).

    python -m bench.adaptive [--instances 3] [--burst 24] [--task-seconds 2] [--gap 40]

The workload: a burst of short calls, an idle gap longer than the idle timeout, another burst.
Fixed: AzureCluster(n=instances, waitfor=True). Adaptive: AzureCluster(adapt=Adapt(minimum=0,
maximum=instances, idle_timeout=...)). Both include their instances' start-up (what a user
pays). Results: a table on stdout and JSON under bench/results/.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

from bench.services import bench_environment, local_cloud, prefect_server, write_results

_OWN_HOME = bench_environment()  # before prefect is imported


def work(i: int, seconds: float) -> int:
    time.sleep(seconds)
    return i


def run_workload(cluster, args: argparse.Namespace) -> float:
    started = time.monotonic()
    for burst in range(2):
        futures = [cluster.submit(lambda i=i: work(i, args.task_seconds)) for i in range(args.burst)]
        assert [f.result(timeout=600) for f in futures] == list(range(args.burst))
        if burst == 0:
            time.sleep(args.gap)
    return time.monotonic() - started


def vm_seconds(admin, group: str) -> float:
    by_instance = admin.counters()["instance_seconds"]["by_instance"]
    return sum(s for name, s in by_instance.items() if name.startswith(f"{group}_"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--instances", type=int, default=3)
    parser.add_argument("--burst", type=int, default=24)
    parser.add_argument("--task-seconds", type=float, default=2.0)
    parser.add_argument("--gap", type=float, default=40.0)
    parser.add_argument("--idle-timeout", type=float, default=5.0)
    args = parser.parse_args()

    from prefect_azmanagers import Adapt, AzureCluster
    from prefect_azmanagers.localcloud.admin import LocalCloudAdmin

    root = Path(tempfile.mkdtemp(prefix="azm-bench-adaptive-"))
    rows = {}
    with prefect_server(root, os.environ["PREFECT_API_URL"]), \
            local_cloud(root, os.environ["PREFECT_API_URL"]) as info, \
            LocalCloudAdmin.from_info(info) as admin:
        for name, options in (
                ("fixed", dict(waitfor=True)),
                ("adaptive", dict(adapt=Adapt(minimum=0, maximum=args.instances,
                                              idle_timeout=args.idle_timeout, interval=0.5)))):
            group = f"bench-{name}-{os.getpid()}"
            n = args.instances if name == "fixed" else None
            t0 = time.monotonic()
            with AzureCluster("localcloud-small", n, manifest="localcloud", group=group,
                              progress=False, join_timeout=600, **options) as cluster:
                workload = run_workload(cluster, args)
                usage = cluster.usage()
            total = time.monotonic() - t0
            rows[name] = {"completion_s": total, "workload_s": workload,
                          "instance_seconds": vm_seconds(admin, group),
                          "instances_used": usage.instances, "requeued": usage.requeued}
    fixed, adaptive = rows["fixed"], rows["adaptive"]
    print(f"{'':10} {'completion s':>13} {'instance-s':>11} {'instances':>10}")
    for name, row in rows.items():
        print(f"{name:10} {row['completion_s']:13.1f} {row['instance_seconds']:11.1f} "
              f"{row['instances_used']:10d}")
    saved = 1 - adaptive["instance_seconds"] / fixed["instance_seconds"]
    slower = adaptive["completion_s"] / fixed["completion_s"] - 1
    print(f"adaptive: {saved:.0%} fewer instance-seconds, completion {slower:+.0%} vs fixed")
    write_results("adaptive", {"args": vars(args), "rows": rows, "saved": saved, "slower": slower},
                  datetime.now(timezone.utc).strftime("%Y-%m-%dT%H%M%S%z"))


if __name__ == "__main__":
    main()
