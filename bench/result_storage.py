"""A task's result back to the driver: through the SSH channel versus through Blob Storage.

    python -m bench.result_storage [--sizes-mb 1 100] [--repeat 3]

One local cloud with Azurite (the manifest's blob container) and one warm cluster of one
instance, so each row times only the result's trip. Per size:
- ssh: the default (nothing persisted): the value travels in the agent's RESULT frame;
- blob, wait: `persist_result=True`: the worker writes the value to the container and only its
  record travels; the driver waits for the task run without reading the value;
- blob, result: the same, then `future.result()` reads the value from the container.
Times are medians over --repeat task runs, from submit to the value (or the final state) on
the driver. Results: a table on stdout and JSON under bench/results/.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlsplit

from bench.services import bench_environment, local_cloud, prefect_server, write_results

_OWN_HOME = bench_environment()  # before prefect is imported


def payload(size: int) -> bytes:
    return os.urandom(1024) * (size // 1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[1, 100])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    from prefect import flow, task

    from prefect_azmanagers import AzureCluster, AzureScaleSetTaskRunner

    plain = task(payload, name="payload")
    persisted = task(payload, name="payload-persisted", persist_result=True)

    def timed(cluster, which, size: int, read: bool) -> float:
        @flow(task_runner=AzureScaleSetTaskRunner(cluster=cluster))
        def one() -> float:
            started = time.perf_counter()
            future = which.submit(size)
            if read:
                assert len(future.result()) == size
            else:
                future.wait()
                assert future.state.is_completed()
            return time.perf_counter() - started

        return statistics.median(one() for _ in range(args.repeat))

    root = Path(tempfile.mkdtemp(prefix="azm-bench-results-"))
    rows = {}
    with prefect_server(root, os.environ["PREFECT_API_URL"]), \
            local_cloud(root, os.environ["PREFECT_API_URL"]):
        with AzureCluster("localcloud-small", 1, manifest="localcloud", waitfor=True, progress=False,
                          forward_ports=(urlsplit(os.environ["PREFECT_API_URL"]).port,),
                          join_timeout=600) as cluster:
            timed(cluster, plain, 1024, True)  # the slot's first task run (engine set-up) is not timed
            for mb in args.sizes_mb:
                size = mb << 20
                rows[f"{mb} MB"] = {"ssh_s": timed(cluster, plain, size, True),
                                    "blob_wait_s": timed(cluster, persisted, size, False),
                                    "blob_result_s": timed(cluster, persisted, size, True)}
    print(f"{'result':>8} {'ssh s':>8} {'blob wait s':>12} {'blob result s':>14}")
    for name, row in rows.items():
        print(f"{name:>8} {row['ssh_s']:8.2f} {row['blob_wait_s']:12.2f} {row['blob_result_s']:14.2f}")
    write_results("result_storage", {"args": vars(args), "rows": rows},
                  datetime.now(timezone.utc).strftime("%Y-%m-%dT%H%M%S%z"))


if __name__ == "__main__":
    main()
