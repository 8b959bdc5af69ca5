"""Per-call overhead of MPI workers: K ranks per worker against a plain agent (K=0).

On a fresh local cloud, one AzureCluster per K (1 instance, 1 worker) runs the same calls one
after another, each waiting for the previous result (round-trip latency, not throughput):

  noop       `lambda: None`: what the engine adds per call (K>0: the payload goes to every
             rank and rank 0 waits until all of them reported)
  allreduce  one `comm().allreduce` over the worker's ranks (K>0 only)

    .venv/bin/python bench/mpi_overhead.py            # K = 0, 2, 4; 200 calls each
    .venv/bin/python bench/mpi_overhead.py 300 0 4    # 300 calls, K = 0 and 4

Prints a table (ms per call, ratio to K=0) and writes bench/results/mpi_overhead.json.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from arm_requests import blocks  # bench/ is sys.path[0] when run as a script

from prefect_azmanagers.cluster.cluster import AzureCluster
from prefect_azmanagers.localcloud import start, stop

RESULTS = Path(__file__).with_name("results") / "mpi_overhead.json"
WARMUP = 10


def noop() -> None:
    return None


def allreduce() -> int:
    from prefect_azmanagers.mpi import comm

    return comm().allreduce(1)


def latencies(cluster: AzureCluster, fn, calls: int) -> list[float]:
    for _ in range(WARMUP):
        cluster.submit(fn).result(timeout=120)
    samples = []
    for _ in range(calls):
        started = time.perf_counter()
        cluster.submit(fn).result(timeout=120)
        samples.append((time.perf_counter() - started) * 1000)
    return samples


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {"mean_ms": round(statistics.fmean(ordered), 2),
            "p50_ms": round(ordered[len(ordered) // 2], 2),
            "p95_ms": round(ordered[int(len(ordered) * 0.95)], 2)}


def measure(info: dict, ranks: int, calls: int) -> dict[str, dict[str, float]]:
    manifest, template = blocks(info)
    with AzureCluster(template, 1, manifest=manifest, group=f"mpibench{ranks}",
                      mpi_ranks_per_worker=ranks, waitfor=True, join_timeout=600,
                      progress=False) as cluster:
        cluster.output_handler = lambda worker, stream, line: None
        results = {"noop": summary(latencies(cluster, noop, calls))}
        if ranks:
            assert cluster.submit(allreduce).result(timeout=120) == ranks
            results["allreduce"] = summary(latencies(cluster, allreduce, calls))
    return results


def table(results: dict[int, dict], calls: int) -> str:
    base = results[0]["noop"]["mean_ms"] if 0 in results else None
    head = f"{'K ranks':>8} {'call':>10} {'mean ms':>9} {'p50 ms':>8} {'p95 ms':>8} {'mean / K=0 noop':>16}"
    lines = [f"{calls} sequential calls per row, 1 worker on 1 local-cloud instance", head,
             "-" * len(head)]
    for ranks in sorted(results):
        for call, s in results[ranks].items():
            ratio = f"{s['mean_ms'] / base:.2f}x" if base else "-"
            lines.append(f"{ranks:>8} {call:>10} {s['mean_ms']:>9} {s['p50_ms']:>8} "
                         f"{s['p95_ms']:>8} {ratio:>16}")
    return "\n".join(lines)


def main(calls: int, rank_counts: list[int]) -> None:
    state = Path(tempfile.mkdtemp(prefix="azm-bench-mpi-"))
    info = start(state)
    results: dict[int, dict] = {}
    try:
        for ranks in rank_counts:
            results[ranks] = measure(info, ranks, calls)
    finally:
        stop(state)
    print(table(results, calls))
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"calls": calls, "results": results}, indent=2) + "\n")
    print(f"\nwritten to {RESULTS}")


if __name__ == "__main__":
    arguments = [int(a) for a in sys.argv[1:]]
    main(arguments[0] if arguments else 200, arguments[1:] or [0, 2, 4])
