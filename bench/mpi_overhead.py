"""Per-call overhead of MPI workers: K ranks per worker against a plain agent (K=0).

On a fresh local cloud, one AzureCluster per K (1 instance, 1 worker) runs the same calls one
after another, each waiting for the previous result (round-trip latency, not throughput); the
clusters take turns call by call, so the machine's load weighs on every K alike:

  noop       `lambda: None`: what the engine adds per call (K>0: the payload goes to every
             rank and rank 0 waits until all of them reported)
  allreduce  one `comm().allreduce` over the worker's ranks (K>0 only)

    .venv/bin/python bench/mpi_overhead.py            # K = 0, 2, 4; 200 calls each
    .venv/bin/python bench/mpi_overhead.py 300 0 4    # 300 calls, K = 0 and 4

Prints a table (ms per call, ratio to K=0) and writes bench/results/mpi_overhead.json.
"""

from __future__ import annotations

import contextlib
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


def interleaved(clusters: dict[int, AzureCluster], fns: dict[int, object], calls: int
                ) -> dict[int, list[float]]:
    """Round-robin one call per cluster per round, so load on the machine hits every K alike."""
    samples: dict[int, list[float]] = {ranks: [] for ranks in clusters}
    for round_ in range(WARMUP + calls):
        for ranks, cluster in clusters.items():
            started = time.perf_counter()
            cluster.submit(fns[ranks]).result(timeout=120)
            if round_ >= WARMUP:
                samples[ranks].append((time.perf_counter() - started) * 1000)
    return samples


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {"mean_ms": round(statistics.fmean(ordered), 2),
            "p50_ms": round(ordered[len(ordered) // 2], 2),
            "p95_ms": round(ordered[int(len(ordered) * 0.95)], 2)}


def measure(info: dict, rank_counts: list[int], calls: int) -> dict[int, dict[str, dict]]:
    manifest, template = blocks(info)
    with contextlib.ExitStack() as stack:
        clusters = {}
        for ranks in rank_counts:  # all provisioned at once, then measured side by side
            cluster = AzureCluster(template, 1, manifest=manifest, group=f"mpibench{ranks}",
                                   mpi_ranks_per_worker=ranks, join_timeout=600, progress=False)
            cluster.output_handler = lambda worker, stream, line: None
            clusters[ranks] = stack.enter_context(cluster)
        for cluster in clusters.values():
            cluster.wait_for_workers(timeout=600)
        noop_ms = interleaved(clusters, {r: noop for r in clusters}, calls)
        mpi = {r: c for r, c in clusters.items() if r}
        reduce_ms = interleaved(mpi, {r: allreduce for r in mpi}, calls) if mpi else {}
    return {ranks: {"noop": summary(noop_ms[ranks]),
                    **({"allreduce": summary(reduce_ms[ranks])} if ranks else {})}
            for ranks in rank_counts}


def table(results: dict[int, dict], calls: int) -> str:
    base = results[0]["noop"] if 0 in results else None
    head = (f"{'K ranks':>8} {'call':>10} {'mean ms':>9} {'p50 ms':>8} {'p95 ms':>8} "
            f"{'p50 - K=0 p50':>14} {'p50 / K=0 p50':>14}")
    lines = [f"{calls} sequential calls per row, 1 worker on 1 local-cloud instance per K, "
             "the K's taking turns", head,
             "-" * len(head)]
    for ranks in sorted(results):
        for call, s in results[ranks].items():
            extra = f"{s['p50_ms'] - base['p50_ms']:+.2f}" if base else "-"
            ratio = f"{s['p50_ms'] / base['p50_ms']:.2f}x" if base else "-"
            lines.append(f"{ranks:>8} {call:>10} {s['mean_ms']:>9} {s['p50_ms']:>8} "
                         f"{s['p95_ms']:>8} {extra:>14} {ratio:>14}")
    return "\n".join(lines)


def main(calls: int, rank_counts: list[int]) -> None:
    state = Path(tempfile.mkdtemp(prefix="azm-bench-mpi-"))
    info = start(state)
    try:
        results = measure(info, rank_counts, calls)
    finally:
        stop(state)
    print(table(results, calls))
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"calls": calls, "results": results}, indent=2) + "\n")
    print(f"\nwritten to {RESULTS}")


if __name__ == "__main__":
    arguments = [int(a) for a in sys.argv[1:]]
    main(arguments[0] if arguments else 200, arguments[1:] or [0, 2, 4])
